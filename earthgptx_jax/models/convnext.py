"""ConvNeXt trunk of open_clip's CLIP-ConvNeXt models (timm `ConvNeXt`), in Flax Linen.

EarthGPT-X takes local texture from a CLIP ConvNeXt (open_clip `convnext_large_d_320`, whose
visual trunk is timm's `convnext_large`). This is that trunk: a stem (`stem_type` "patch": a
`patch_size` patchify conv + LayerNorm; timm's "overlap" stems: two 3x3 stride-2 convs, with a
GELU between them in "overlap_act" and half-width between them in "overlap_tiered", +
LayerNorm), then stages, each a (LayerNorm + 2x2 stride-2 conv) downsampling (every stage but
the first; the first too after a stride-2 stem, as timm builds it) followed by blocks of
depthwise 7x7 conv -> LayerNorm -> Linear(4C) -> GELU(exact) -> Linear(C) -> layer scale ->
residual. It returns every stage's feature map and the trunk's pooled, normalised
feature (timm `head.norm`); classifier and CLIP projection heads are not part of the encoder.
Numerically checked against timm / open_clip / HF ConvNext by tests/test_convnext.py; weights
convert with `earthgptx_jax.convert.vision`.

Config: `get_config(...).model.vision.convnext` (configs/fusion.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from earthgptx_jax.models import layers

Array = jax.Array
# timm initialises convs and linears with trunc_normal(std=.02), biases with zeros.
_KERNEL_INIT = nn.initializers.truncated_normal(0.02)
_FEATURE_MAP = ("activation_batch", None, None, "activation_embed")

STEM_TYPES = ("patch", "overlap", "overlap_tiered", "overlap_act")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the field when the module cannot represent `config`."""
  if len(config.depths) != len(config.dims) or not config.depths:
    raise ValueError(f"convnext: depths {tuple(config.depths)} and dims {tuple(config.dims)} "
                     f"must be non-empty and of equal length")
  if any(d < 0 for d in config.depths) or any(c <= 0 for c in config.dims):
    raise ValueError(f"convnext: depths must be >= 0 and dims > 0, got {tuple(config.depths)}, "
                     f"{tuple(config.dims)}")
  if config.kernel_size % 2 != 1:
    raise ValueError(f"convnext.kernel_size: must be odd, got {config.kernel_size}")
  if config.stem_type not in STEM_TYPES:
    raise ValueError(f"convnext.stem_type: unknown value {config.stem_type!r}; expected one of "
                     f"{STEM_TYPES}")
  if config.stem_type != "patch" and config.patch_size != 4:
    raise ValueError(f"convnext.patch_size: the {config.stem_type!r} stem has stride 4; "
                     f"patch_size={config.patch_size} applies to the 'patch' stem only")


def stage_strides(config: Mapping) -> tuple[int, ...]:
  """Each stage's downsampling stride, by timm's rule: 2 for every stage but the first, and for
  the first too when the stem's stride is 2 (HF's ConvNext never downsamples stage 0)."""
  stem_stride = config["patch_size"]  # 4 for the overlap stems (check_config)
  return tuple(2 if i > 0 or stem_stride == 2 else 1 for i in range(len(config["dims"])))


def total_stride(config: ml_collections.ConfigDict, stage: int) -> int:
  """Pixels per feature-map cell at `stage` (negative counts from the end)."""
  stage = range(len(config.dims))[stage]
  return config.patch_size * math.prod(stage_strides(config)[:stage + 1])


def stem_mid_channels(config: ml_collections.ConfigDict) -> int:
  """Width between the two convs of an overlap stem (timm: dims[0], or half of it rounded to a
  multiple of 8 by `make_divisible` in "overlap_tiered")."""
  if config.stem_type != "overlap_tiered":
    return config.dims[0]
  half = config.dims[0] // 2
  rounded = max(8, (half + 4) // 8 * 8)
  return rounded + 8 if rounded < 0.9 * half else rounded


DEPTHWISE_IMPLS = ("auto", "xla", "shift")


class DepthwiseConv(nn.Module):
  """x: [B, H, W, C] -> [B, H, W, C], k x k depthwise conv, 'same' padding (torch padding k//2).

  Params are a Conv's (`kernel` [k, k, 1, C], `bias` [C]). `impl`: `xla` is a grouped
  `conv_general_dilated`; `shift` sums k*k shifted, scaled copies of the input (one fused
  elementwise loop, accumulated in float32), which XLA:CPU runs >10x faster than its grouped
  convolution (benchmarks/encoders.py), and whose backward pass is written the same way (the
  tiny preset's whole train step: 0.150 s against 0.197 s with the grouped conv's VJP, compile
  time unchanged); `auto` picks `shift` on CPU and `xla` elsewhere.
  """
  features: int
  kernel_size: int
  impl: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, c = self.kernel_size, self.features
    if self.impl not in DEPTHWISE_IMPLS:
      raise ValueError(f"convnext.depthwise_impl: unknown value {self.impl!r}; expected one of "
                       f"{DEPTHWISE_IMPLS}")
    kernel = self.param("kernel", nn.with_logical_partitioning(
        _KERNEL_INIT, ("conv_height", "conv_width", None, "conv_out")), (k, k, 1, c),
        self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                      (c,), self.param_dtype)
    impl = self.impl
    if impl == "auto":
      impl = "shift" if jax.default_backend() == "cpu" else "xla"
    conv = _depthwise_shift if impl == "shift" else _depthwise_xla
    y = conv(x.astype(self.dtype), kernel.astype(self.dtype))
    return (y + bias.astype(jnp.float32)).astype(self.dtype)


def _depthwise_xla(x: Array, kernel: Array) -> Array:
  """x: [B, H, W, C], kernel: [k, k, 1, C] -> float32 [B, H, W, C]."""
  k = kernel.shape[0]
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), ((k // 2, k // 2),) * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1], preferred_element_type=jnp.float32)


def _shifted_sum(x: Array, kernel: Array) -> Array:
  """x: [B, H, W, C], kernel: [k, k, 1, C] -> float32 [B, H, W, C]: the 'same' correlation as
  k*k shifted multiply-adds (one fused elementwise loop on XLA:CPU)."""
  k = kernel.shape[0]
  h, w = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0))).astype(jnp.float32)
  taps = kernel.astype(jnp.float32)
  y = jnp.zeros(x.shape, jnp.float32)
  for i in range(k):
    for j in range(k):
      y = y + padded[:, i:i + h, j:j + w] * taps[i, j, 0]
  return y


@jax.custom_vjp
def _depthwise_shift(x: Array, kernel: Array) -> Array:
  """Same as `_depthwise_xla`, as shifted multiply-adds (fast on XLA:CPU, both passes)."""
  return _shifted_sum(x, kernel)


def _depthwise_shift_fwd(x, kernel):
  return _shifted_sum(x, kernel), (x, kernel)


def _depthwise_shift_bwd(residuals, grad):
  # Written out: autodiff of the k*k slices is k*k pads (slow to compile), and the grouped
  # conv's VJP is the slow XLA:CPU convolution the forward avoids. The input gradient is the
  # same correlation with the kernel flipped; each tap's gradient is one shifted product, summed.
  x, kernel = residuals
  k = kernel.shape[0]
  h, w = x.shape[1:3]
  grad = grad.astype(jnp.float32)
  dx = _shifted_sum(grad, kernel[::-1, ::-1])
  padded = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0))).astype(jnp.float32)
  dkernel = jnp.stack([jnp.stack([(padded[:, i:i + h, j:j + w] * grad).sum((0, 1, 2))
                                  for j in range(k)]) for i in range(k)])[:, :, None]
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


class ConvNeXtBlock(nn.Module):
  """x: [B, H, W, C] -> [B, H, W, C]; timm `ConvNeXtBlock` with `conv_mlp=False`."""
  config: ml_collections.ConfigDict
  dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg, dim = self.config, self.dim
    k = cfg.kernel_size
    y = DepthwiseConv(dim, k, cfg.depthwise_impl, self.dtype, self.param_dtype,
                      name="conv_dw")(x)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = layers.layer_norm(cfg.layer_norm_eps, name="norm", **kw)(y)
    y = layers.dense(int(cfg.mlp_ratio * dim), ("conv_in", "mlp"), kernel_init=_KERNEL_INIT,
                     name="fc1", **kw)(y)
    y = nn.gelu(y, approximate=False)
    y = layers.dense(dim, ("mlp", "conv_in"), kernel_init=_KERNEL_INIT, name="fc2", **kw)(y)
    if cfg.layer_scale_init is not None:
      gamma = self.param("gamma", nn.with_logical_partitioning(
          nn.initializers.constant(cfg.layer_scale_init), ("norm",)), (dim,), self.param_dtype)
      y = y * gamma.astype(self.dtype)
    return nn.with_logical_constraint(x + y, _FEATURE_MAP)


class ConvNeXtOutput(NamedTuple):
  stages: tuple[Array, ...]  # per stage i: [B, H / s_i, W / s_i, dims[i]], s_i = total_stride(i)
  pooled: Array  # [B, dims[-1]]: LayerNorm(mean of the last map), timm's `head.norm` /
  #                HF's pooler; unused outputs cost nothing under jit (XLA drops them)


class ConvNeXt(nn.Module):
  """x: [B, H, W, C_in] (already normalised) -> ConvNeXtOutput (per-stage maps, pooled).

  Sizes, `dtype` (compute), `param_dtype` and `remat` (recompute each block's activations in
  the backward pass) come from `config`.
  """
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: Array) -> ConvNeXtOutput:
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    check_config(cfg)
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
      raise ValueError(f"convnext input: expected [B, H, W, {cfg.in_channels}], got {x.shape}")
    min_side = total_stride(cfg, -1)
    if min(x.shape[1:3]) < min_side:
      raise ValueError(f"convnext input: height and width must be >= {min_side} pixels, got "
                       f"{x.shape[1:3]}")
    block_cls = nn.remat(ConvNeXtBlock) if cfg.remat else ConvNeXtBlock
    x = x.astype(dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    if cfg.stem_type == "patch":
      p = cfg.patch_size
      x = layers.conv(cfg.dims[0], p, stride=p, kernel_init=_KERNEL_INIT, name="stem_conv",
                      **kw)(x)
    else:
      x = layers.conv(stem_mid_channels(cfg), 3, stride=2, padding=1, kernel_init=_KERNEL_INIT,
                      name="stem_conv", **kw)(x)
      if cfg.stem_type == "overlap_act":
        x = nn.gelu(x, approximate=False)
      x = layers.conv(cfg.dims[0], 3, stride=2, padding=1, kernel_init=_KERNEL_INIT,
                      name="stem_conv2", **kw)(x)
    x = layers.layer_norm(cfg.layer_norm_eps, name="stem_norm", **kw)(x)
    features = []
    strides = stage_strides(cfg)
    for i, (depth, dim) in enumerate(zip(cfg.depths, cfg.dims)):
      if strides[i] > 1:
        x = layers.layer_norm(cfg.layer_norm_eps, name=f"stages_{i}_downsample_norm", **kw)(x)
        x = layers.conv(dim, 2, stride=2, kernel_init=_KERNEL_INIT,
                        name=f"stages_{i}_downsample_conv", **kw)(x)
      for j in range(depth):
        x = block_cls(cfg, dim, dtype, param_dtype, name=f"stages_{i}_blocks_{j}")(x)
      features.append(nn.with_logical_constraint(x, _FEATURE_MAP))
    pooled = layers.layer_norm(cfg.head_norm_eps, name="head_norm", **kw)(x.mean(axis=(1, 2)))
    return ConvNeXtOutput(stages=tuple(features), pooled=pooled)
