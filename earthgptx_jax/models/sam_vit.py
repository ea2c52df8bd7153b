"""SAM's ViT image encoder (windowed + global attention, decomposed relative position bias, neck).

Numerically transformers' `SamVisionEncoder` on the same weights (tests/test_sam_parity.py),
channels-last: pixel_values [B, H, W, 3] (already normalised) -> embeddings [B, h, w, C_out],
h = H / patch_size. Parameter names follow HF so that `convert/sam.py` is a flat key map.

Sizes come from `config.model.pixel.sam_vit`: image_size, patch_size, hidden_size, num_layers,
num_heads, mlp_dim, window_size, global_attn_indexes, layer_norm_eps, qkv_bias, attention_impl,
remat (recompute each layer in the backward pass); the neck width is the mask decoder's hidden
size.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from earthgptx_jax.models.attention import dot_product_attention, resolve_implementation
from earthgptx_jax.models.layers import conv, dense, layer_norm
from earthgptx_jax.models.mask_decoder import MLPBlock

Dtype = Any

_ACTIVATION_2D = ("activation_batch", None, None, "activation_embed")


def relative_positions(size: int, rel_pos: jax.Array) -> jax.Array:
  """Table [2*size-1, D] -> per (query, key) embedding [size, size, D] (SAM's get_rel_pos).

  SAM interpolates the table when the grid differs from the one it was trained on; here the
  grid is fixed by the config, so a table of another length is a conversion error.
  """
  if rel_pos.shape[0] != 2 * size - 1:
    raise ValueError(f"relative position table: expected {2 * size - 1} rows for a {size}-wide "
                     f"attention grid, got {rel_pos.shape[0]} (image_size/window_size mismatch)")
  idx = jnp.arange(size)[:, None] - jnp.arange(size)[None, :] + (size - 1)
  return rel_pos[idx]


def rel_pos_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias_h: jax.Array,
                      bias_w: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(H) + bias_h + bias_w) v without a [B, N, hw, hw] bias tensor.

  q, k: [B, h, w, N, H]; v: [B, hw, N, H]; bias_h: [B, N, h, w, h] (per query, key row);
  bias_w: [B, N, h, w, w] (per query, key column). The two small biases are broadcast into the
  float32 logits [B, N, h, w, h, w], where XLA fuses the adds into the logits' producer, instead
  of first writing and then reading a full [B, N, T, S] bias (what `dot_product_attention`'s
  `bias` argument needs). Returns [B, hw, N, H] in v's dtype; the `xla` implementation's math.
  """
  b, h, w, n, c = q.shape
  # The flat [B, N, T, S] product (the dot jax's attention emits), viewed as [B, N, h, w, h, w].
  logits = jnp.einsum("btnc,bsnc->bnts", q.reshape(b, h * w, n, c), k.reshape(b, h * w, n, c),
                      preferred_element_type=jnp.float32).reshape(b, n, h, w, h, w)
  logits = (logits * jnp.float32(c ** -0.5) + bias_h[..., :, None].astype(jnp.float32)
            + bias_w[..., None, :].astype(jnp.float32))
  probs = jax.nn.softmax(logits.reshape(b, n, h * w, h * w), axis=-1).astype(v.dtype)
  return jnp.einsum("bnts,bsnc->btnc", probs, v)


class VisionAttention(nn.Module):
  """Multi-head self-attention over an h x w grid with decomposed relative position bias.

  x [B, h, w, D] -> [B, h, w, D]; the bias q . R_h[qy - ky] + q . R_w[qx - kx] uses the unscaled
  query, as SAM/MViTv2 do.
  """
  num_heads: int
  grid: int  # h = w of the attended grid (window size, or the full grid for global layers)
  qkv_bias: bool
  attention_impl: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, d = x.shape
    head_dim = d // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = dense(3 * d, ("vit_embed", "vit_mlp"), use_bias=self.qkv_bias, name="qkv", **kw)(x)
    qkv = qkv.reshape(b, h * w, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, hw, N, H]

    init = nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02),
                                        (None, "vit_head_dim"))
    rel_h = self.param("rel_pos_h", init, (2 * self.grid - 1, head_dim), self.param_dtype)
    rel_w = self.param("rel_pos_w", init, (2 * self.grid - 1, head_dim), self.param_dtype)
    rh = relative_positions(h, rel_h).astype(self.dtype)  # [h, h, H]
    rw = relative_positions(w, rel_w).astype(self.dtype)
    qg = q.reshape(b, h, w, self.num_heads, head_dim)
    bias_h = jnp.einsum("byxnc,ykc->bnyxk", qg, rh)
    bias_w = jnp.einsum("byxnc,xkc->bnyxk", qg, rw)
    if resolve_implementation(self.attention_impl, q.dtype, head_dim) == "xla":
      out = rel_pos_attention(qg, k.reshape(qg.shape), v, bias_h, bias_w)
    else:  # fused kernels take the bias as one [B, N, T, S] tensor (in the compute dtype)
      bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(b, self.num_heads, h * w,
                                                                   h * w)
      out = dot_product_attention(q, k, v, bias=bias, implementation=self.attention_impl)
    out = out.reshape(b, h, w, d)
    return dense(d, ("vit_mlp", "vit_embed"), name="proj", **kw)(out)


def window_partition(x: jax.Array, window: int) -> jax.Array:
  """[B, h, w, D] -> [B * nh * nw, window, window, D], zero-padding h, w up to a multiple."""
  b, h, w, d = x.shape
  ph, pw = -h % window, -w % window
  x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  nh, nw = (h + ph) // window, (w + pw) // window
  x = x.reshape(b, nh, window, nw, window, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b * nh * nw, window, window, d)


def window_unpartition(windows: jax.Array, window: int, hw: tuple[int, int]) -> jax.Array:
  """Inverse of window_partition: [B * nh * nw, window, window, D] -> [B, h, w, D]."""
  h, w = hw
  nh, nw = -(-h // window), -(-w // window)
  d = windows.shape[-1]
  x = windows.reshape(-1, nh, nw, window, window, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, nh * window, nw * window, d)[:, :h, :w]


class VisionLayer(nn.Module):
  """Pre-norm block; attention within windows (window > 0) or over the whole grid (0)."""
  config: ml_collections.ConfigDict
  window: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    grid = cfg.image_size // cfg.patch_size
    y = layer_norm(cfg.layer_norm_eps, name="layer_norm1", **kw)(x)
    attn = VisionAttention(cfg.num_heads, self.window or grid, cfg.qkv_bias, cfg.attention_impl,
                           name="attn", **kw)
    if self.window:
      y = window_unpartition(attn(window_partition(y, self.window)), self.window, x.shape[1:3])
    else:
      y = attn(y)
    x = x + y
    x = x + MLPBlock(cfg.mlp_dim, "gelu", name="mlp", **kw)(
        layer_norm(cfg.layer_norm_eps, name="layer_norm2", **kw)(x))
    return nn.with_logical_constraint(x, _ACTIVATION_2D)


class SamVisionEncoder(nn.Module):
  """pixel_values [B, S, S, 3] normalised with SAM's mean/std -> embeddings [B, h, w, out]."""
  config: ml_collections.ConfigDict
  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if pixel_values.shape[1:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"sam_pixel_values: expected [B, {cfg.image_size}, {cfg.image_size}, 3], "
                       f"got {pixel_values.shape}")
    grid = cfg.image_size // cfg.patch_size
    x = conv(cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, name="patch_embed", **kw)(
        pixel_values)
    pos = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.truncated_normal(0.02), (None, None, None, "vit_embed")),
                     (1, grid, grid, cfg.hidden_size), self.param_dtype)
    x = nn.with_logical_constraint(x + pos.astype(self.dtype), _ACTIVATION_2D)
    global_layers = set(cfg.global_attn_indexes)
    # remat: a layer's activations (at 1024 px, SAM-H: ~0.5 GB per global layer's scores and
    # ~15 GB per image in all) are recomputed in the backward pass instead of kept.
    layer = nn.remat(VisionLayer) if cfg.get("remat", False) else VisionLayer
    for i in range(cfg.num_layers):
      x = layer(cfg, 0 if i in global_layers else cfg.window_size, name=f"layers_{i}", **kw)(x)
    x = conv(self.out_channels, 1, use_bias=False, name="neck_conv1", **kw)(x)
    x = layer_norm(cfg.layer_norm_eps, name="neck_layer_norm1", **kw)(x)
    x = conv(self.out_channels, 3, padding=1, use_bias=False, name="neck_conv2", **kw)(x)
    return layer_norm(cfg.layer_norm_eps, name="neck_layer_norm2", **kw)(x)
