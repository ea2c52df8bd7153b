"""Shared building blocks whose parameters carry logical axis names.

`dense`, `layer_norm` and `conv` are Flax's own modules with named axes (sharding.py maps the
names onto the mesh): a bias takes the name of the kernel's output axis and a LayerNorm's scale
and bias are `("norm",)`; parameter names (`kernel`, `bias`, `scale`) stay those the conversion
tables expect. Modules configured by a ConfigDict with `dtype`, `param_dtype`,
`initializer_range` and `layer_norm_eps` (prompt encoder, integration block, region features,
box head) bind those once with `dense_from(config)` / `layer_norm_from(config)`.

Also here, shared by the prompt encoder and the integration block: SAM's random-Fourier position
encoding (`fourier_gaussian`, `fourier_features`), multi-head `Attention` with a key mask and the
GELU `FeedForward`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from earthgptx_jax.models import attention

Dtype = Any
Initializer = Callable[..., Any]
Names = tuple[str | None, ...]

CONV_NAMES = ("conv_height", "conv_width", "conv_in", "conv_out")


def dense(features: int, names: Names, *, dtype: Dtype, param_dtype: Dtype,
          kernel_init: Initializer = nn.initializers.lecun_normal(),
          bias_init: Initializer = nn.initializers.zeros, use_bias: bool = True,
          name: str | None = None) -> nn.Dense:
  """nn.Dense whose kernel [in, out] carries logical `names` and its bias [out] names[-1].

  `kernel_init` defaults to Flax's (lecun normal), which modules converted from torch keep.
  """
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(kernel_init, names),
      bias_init=nn.with_logical_partitioning(bias_init, names[-1:]))


def layer_norm(epsilon: float, *, dtype: Dtype, param_dtype: Dtype,
               name: str | None = None) -> nn.LayerNorm:
  """nn.LayerNorm with scale and bias named ("norm",)."""
  return nn.LayerNorm(
      epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def conv(features: int, kernel: int, *, dtype: Dtype, param_dtype: Dtype, stride: int = 1,
         padding: int = 0, names: Names = CONV_NAMES,
         kernel_init: Initializer = nn.initializers.lecun_normal(), use_bias: bool = True,
         name: str | None = None) -> nn.Conv:
  """Square nn.Conv, NHWC, kernel [k, k, in, out] with logical `names`, bias [out] names[-1]."""
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride),
      padding=((padding, padding), (padding, padding)), use_bias=use_bias, dtype=dtype,
      param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(kernel_init, names),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]))


def dtypes(config: ml_collections.ConfigDict) -> dict[str, Dtype]:
  """{"dtype": compute dtype, "param_dtype": ...} from a module config's dtype names."""
  return {"dtype": jnp.dtype(config.dtype), "param_dtype": jnp.dtype(config.param_dtype)}


def dense_from(config: ml_collections.ConfigDict) -> Callable[..., nn.Dense]:
  """`dense` with the config's dtypes and a truncated-normal(initializer_range) kernel init."""
  return functools.partial(
      dense, kernel_init=nn.initializers.truncated_normal(config.initializer_range),
      **dtypes(config))


def layer_norm_from(config: ml_collections.ConfigDict) -> Callable[..., nn.LayerNorm]:
  """`layer_norm` with the config's layer_norm_eps and dtypes."""
  return functools.partial(layer_norm, config.layer_norm_eps, **dtypes(config))


def fourier_gaussian(config: ml_collections.ConfigDict) -> jax.Array:
  """[2, F] fixed Gaussian frequencies (SAM's `positional_encoding_gaussian_matrix`)."""
  key = jax.random.key(config.fourier_seed)
  return config.fourier_scale * jax.random.normal(key, (2, config.fourier_features), jnp.float32)


def fourier_features(coords: jax.Array, gaussian: jax.Array) -> jax.Array:
  """SAM's random-Fourier encoding: coords [..., 2] (x, y) in [0, 1] -> [..., 2F] float32.

  sin / cos of 2 pi (2 coords - 1) @ gaussian, as `PositionEmbeddingRandom._pe_encoding`.
  """
  projected = 2 * math.pi * ((2 * coords.astype(jnp.float32) - 1) @ gaussian)
  return jnp.concatenate([jnp.sin(projected), jnp.cos(projected)], axis=-1)


class Attention(nn.Module):
  """Multi-head attention, queries x [B, T, D] over context [B, S, D'] -> [B, T, D].

  `key_valid` bool masks keys, the same for every query ([B, S]) or per query ([B, T, S]); a
  query whose keys are all masked gets a finite average (see attention.py) that callers zero
  out.
  """
  config: ml_collections.ConfigDict
  num_heads: int

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, key_valid: jax.Array) -> jax.Array:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"attention: width {width} is not a multiple of num_heads "
                       f"{self.num_heads}")
    heads = (self.num_heads, width // self.num_heads)
    dense = dense_from(self.config)

    def project(y, name):  # [B, T, D'] -> [B, T, N, H]
      y = dense(width, ("vit_embed", "vit_heads"), name=name)(y)
      return y.reshape(y.shape[:2] + heads)

    out = attention.dot_product_attention(
        project(x, "query"), project(context, "key"), project(context, "value"),
        mask=key_valid[:, None, None, :] if key_valid.ndim == 2 else key_valid[:, None],
        implementation=self.config.attention_impl)
    out = out.reshape(out.shape[:2] + (width,))
    return dense(width, ("vit_heads", "vit_embed"), name="out")(out)


class FeedForward(nn.Module):
  """Dense -> GELU -> Dense at hidden width `hidden`; [..., D] -> [..., D]."""
  config: ml_collections.ConfigDict
  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = dense_from(self.config)
    h = dense(self.hidden, ("vit_embed", "vit_mlp"), name="fc1")(x)
    h = nn.gelu(h, approximate=False)
    return dense(x.shape[-1], ("vit_mlp", "vit_embed"), name="fc2")(h)
