"""Vision Transformer in the DINOv2 layout (transformers `Dinov2Model`), in Flax Linen.

EarthGPT-X takes global context from a DINOv2 ViT-L/14; the same module, randomly initialised
with 1 input channel and a small config, is the spatial-aware prompt encoder (issue 4). Layout:
patch-embedding conv, CLS token (+ optional register tokens, as `Dinov2WithRegistersModel`),
learned position embeddings resampled to the input's patch grid, pre-norm blocks with layer
scale (MLP or SwiGLU), final LayerNorm.

Position-embedding resampling matches the reference exactly: `Dinov2Model` calls
`torch.nn.functional.interpolate(mode="bicubic", align_corners=False)` to the target grid size
(Keys cubic with a = -0.75, source index (i + 0.5) * in / out - 0.5, border replicated, no
antialias); `Dinov2WithRegistersModel` adds `antialias=True` (PIL-style: a = -0.5, support
widened by the scale when shrinking, weights renormalised at the borders). Both are separable
linear maps, so they are built once as small matrices (`resize_matrix`) and applied as einsums.

Config: `get_config(...).model.vision.dino` (configs/fusion.py).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from earthgptx_jax.models import attention, layers

Array = jax.Array
_TOKENS = ("activation_batch", "activation_length", "activation_embed")


class ViTOutput(NamedTuple):
  last_hidden_state: Array  # [B, 1 + R + N, D]: CLS, R registers, N patches
  cls: Array  # [B, D]
  patch_tokens: Array  # [B, N, D], row-major over `grid`
  grid: tuple[int, int]  # (patch rows, patch columns), static


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the field when the module cannot represent `config`."""
  if config.hidden_size % config.num_heads:
    raise ValueError(f"vit.hidden_size={config.hidden_size} must be a multiple of "
                     f"num_heads={config.num_heads}")
  if config.pretrain_image_size % config.patch_size:
    raise ValueError(f"vit.pretrain_image_size={config.pretrain_image_size} must be a multiple "
                     f"of patch_size={config.patch_size}")
  if config.num_register_tokens < 0:
    raise ValueError(f"vit.num_register_tokens: must be >= 0, got {config.num_register_tokens}")


def mlp_hidden_size(config: ml_collections.ConfigDict) -> int:
  """MLP width; SwiGLU keeps two thirds, rounded up to a multiple of 8 (as DINOv2 / HF)."""
  hidden = int(config.hidden_size * config.mlp_ratio)
  return (int(hidden * 2 / 3) + 7) // 8 * 8 if config.use_swiglu_ffn else hidden


@functools.lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
  """[out_size, in_size] weights of torch's 1-D bicubic resize (align_corners=False).

  Coordinates and weights are computed in float32 exactly as aten does on CPU, so the result
  matches torch to float32 rounding of the final sums.
  """
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  m = np.zeros([out_size, in_size], np.float32)
  if not antialias:  # aten upsample_bicubic2d: Keys cubic, a = -0.75, border replicated
    a = f32(-0.75)

    def cubic1(t):  # |t| <= 1
      return ((a + 2) * t - (a + 3)) * t * t + 1

    def cubic2(t):  # 1 < |t| < 2
      return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    for o in range(out_size):
      src = scale * (f32(o) + f32(0.5)) - f32(0.5)
      base = int(np.floor(src))
      t = src - f32(base)
      weights = (cubic2(t + 1), cubic1(t), cubic1(1 - t), cubic2(2 - t))
      for tap, w in zip(range(-1, 3), weights):
        m[o, min(max(base + tap, 0), in_size - 1)] += w
    return m
  a = f32(-0.5)  # aten _upsample_bicubic2d_aa: PIL's filter, support widened when shrinking

  def aa_cubic(t):
    t = abs(t)
    if t < 1:
      return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
      return (((t - 5) * t + 8) * t - 4) * a
    return f32(0)

  support = f32(2) * scale if scale >= 1 else f32(2)
  inv = f32(1) / scale if scale >= 1 else f32(1)
  for o in range(out_size):
    center = scale * (f32(o) + f32(0.5))
    lo = max(int(center - support + f32(0.5)), 0)
    hi = min(int(center + support + f32(0.5)), in_size)
    w = np.array([aa_cubic((f32(j) - center + f32(0.5)) * inv) for j in range(lo, hi)], f32)
    total = f32(0)
    for v in w:
      total += v
    m[o, lo:hi] = w / total
  return m


def interpolate_pos_embed(pos: Array, grid: tuple[int, int], antialias: bool) -> Array:
  """pos: [1, 1 + G*G, D] (CLS first, square G x G grid) -> [1, 1 + h*w, D] for grid (h, w)."""
  n = pos.shape[1] - 1
  g = int(round(n ** 0.5))
  if g * g != n:
    raise ValueError(f"position_embeddings: {n} patch positions do not form a square grid")
  h, w = grid
  if (h, w) == (g, g):  # the reference skips resampling at the native grid
    return pos
  patch = pos[0, 1:].reshape(g, g, -1).astype(jnp.float32)
  rows = jnp.asarray(resize_matrix(g, h, antialias), jnp.float32)
  cols = jnp.asarray(resize_matrix(g, w, antialias), jnp.float32)
  # Separable resize in the reference's order (width, then height), fp32 as the reference.
  patch = jnp.einsum("xj,ijd->ixd", cols, patch, precision=jax.lax.Precision.HIGHEST)
  patch = jnp.einsum("yi,ixd->yxd", rows, patch, precision=jax.lax.Precision.HIGHEST)
  patch = patch.astype(pos.dtype).reshape(1, h * w, -1)
  return jnp.concatenate([pos[:, :1], patch], axis=1)


class ViTBlock(nn.Module):
  """x: [B, T, D] -> [B, T, D]: x + ls1 * attn(norm1(x)); x + ls2 * mlp(norm2(x))."""
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    d, heads = cfg.hidden_size, cfg.num_heads
    b, t, _ = x.shape
    dense = functools.partial(
        layers.dense, kernel_init=nn.initializers.truncated_normal(cfg.initializer_range),
        dtype=dt, param_dtype=pdt)
    y = layers.layer_norm(cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, name="norm1")(x)
    qkv = [dense(d, ("vit_embed", "vit_heads"), use_bias=cfg.qkv_bias, name=n)(y)
           .reshape(b, t, heads, d // heads) for n in ("query", "key", "value")]
    y = attention.dot_product_attention(*qkv, implementation=self.attention_impl)
    y = dense(d, ("vit_heads", "vit_embed"), name="out")(y.reshape(b, t, d))
    x = x + y * self._layer_scale("layer_scale1")
    y = layers.layer_norm(cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, name="norm2")(x)
    hidden = mlp_hidden_size(cfg)
    if cfg.use_swiglu_ffn:
      gate, up = jnp.split(dense(2 * hidden, ("vit_embed", "vit_mlp"), name="weights_in")(y), 2,
                           axis=-1)
      y = dense(d, ("vit_mlp", "vit_embed"), name="weights_out")(nn.silu(gate) * up)
    else:
      y = nn.gelu(dense(hidden, ("vit_embed", "vit_mlp"), name="fc1")(y), approximate=False)
      y = dense(d, ("vit_mlp", "vit_embed"), name="fc2")(y)
    x = x + y * self._layer_scale("layer_scale2")
    return nn.with_logical_constraint(x, _TOKENS)

  def _layer_scale(self, name: str) -> Array:
    cfg = self.config
    scale = self.param(name, nn.with_logical_partitioning(
        nn.initializers.constant(cfg.layerscale_value), ("norm",)), (cfg.hidden_size,),
        self.param_dtype)
    return scale.astype(self.dtype)


class ViT(nn.Module):
  """pixel_values: [B, H, W, C] (already normalised) -> ViTOutput.

  Sizes, `dtype` (compute), `param_dtype`, `remat` (recompute block activations in the
  backward pass) and `attention_impl` all come from `config`.

  `bool_masked_pos` [B, N] replaces those patch embeddings by the mask token (DINOv2 / iBOT
  masked modelling). `feature_layer` picks the returned tokens: None -> after the final
  LayerNorm (HF `last_hidden_state`); k -> HF `hidden_states[k]` (output of block k, unnormed;
  negative counts from the end, e.g. -2 = penultimate block as LLaVA uses).
  """
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, pixel_values: Array, bool_masked_pos: Array | None = None,
               feature_layer: int | None = None) -> ViTOutput:
    cfg = self.config
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    check_config(cfg)
    p, d = cfg.patch_size, cfg.hidden_size
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != cfg.in_channels:
      raise ValueError(f"vit input: expected [B, H, W, {cfg.in_channels}], got "
                       f"{pixel_values.shape}")
    grid = (pixel_values.shape[1] // p, pixel_values.shape[2] // p)
    if min(grid) < 1:
      raise ValueError(f"vit input: height and width must be >= patch_size={p}, got "
                       f"{pixel_values.shape[1:3]}")
    if feature_layer is not None and not -cfg.num_layers - 1 <= feature_layer <= cfg.num_layers:
      raise ValueError(f"feature_layer: {feature_layer} out of range for {cfg.num_layers} layers")
    init = nn.initializers.truncated_normal(cfg.initializer_range)
    x = layers.conv(d, p, stride=p, names=("conv_height", "conv_width", "conv_in", "vit_embed"),
                    kernel_init=init, dtype=dt, param_dtype=pdt,
                    name="patch_embed")(pixel_values.astype(dt))
    b = x.shape[0]
    x = x.reshape(b, grid[0] * grid[1], d)
    if cfg.use_mask_token:
      mask_token = self.param("mask_token", nn.with_logical_partitioning(
          nn.initializers.zeros, (None, "vit_embed")), (1, d), pdt)
      if bool_masked_pos is not None:
        if bool_masked_pos.shape != x.shape[:2]:
          raise ValueError(f"bool_masked_pos: expected shape {x.shape[:2]}, got "
                           f"{bool_masked_pos.shape}")
        x = jnp.where(bool_masked_pos[..., None], mask_token.astype(dt)[None], x)
    elif bool_masked_pos is not None:
      raise ValueError("bool_masked_pos: given but the config has use_mask_token=False")
    cls = self.param("cls_token", nn.with_logical_partitioning(init, (None, None, "vit_embed")),
                     (1, 1, d), pdt)
    num_pos = (cfg.pretrain_image_size // p) ** 2 + 1
    pos = self.param("position_embeddings", nn.with_logical_partitioning(
        init, (None, "tokens", "vit_embed")), (1, num_pos, d), pdt)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (b, 1, d)), x], axis=1)
    x = x + interpolate_pos_embed(pos, grid, cfg.pos_interp_antialias).astype(dt)
    if cfg.num_register_tokens:
      registers = self.param("register_tokens", nn.with_logical_partitioning(
          init, (None, "tokens", "vit_embed")), (1, cfg.num_register_tokens, d), pdt)
      x = jnp.concatenate([x[:, :1], jnp.broadcast_to(registers.astype(dt),
                                                      (b, cfg.num_register_tokens, d)),
                           x[:, 1:]], axis=1)
    x = nn.with_logical_constraint(x, _TOKENS)
    block_cls = nn.remat(ViTBlock) if cfg.remat else ViTBlock
    hidden_states = [x]
    for i in range(cfg.num_layers):
      hidden_states.append(block_cls(cfg, dt, pdt, cfg.attention_impl, name=f"layers_{i}")(
          hidden_states[-1]))
    # Every parameter always exists (checkpoints load whole); under jit, XLA drops the blocks
    # after `feature_layer`.
    x = layers.layer_norm(cfg.layer_norm_eps, dtype=dt, param_dtype=pdt,
                          name="norm")(hidden_states[-1])
    if feature_layer is not None:
      x = hidden_states[feature_layer]
    first_patch = 1 + cfg.num_register_tokens
    return ViTOutput(last_hidden_state=x, cls=x[:, 0], patch_tokens=x[:, first_patch:],
                     grid=grid)
