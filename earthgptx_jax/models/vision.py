"""Mixed visual encoders: CLIP-ConvNeXt (local texture) + DINOv2 (global context) per view.

EarthGPT-X encodes every view (global + zoom tiles, see data_pipelines/views.py) with both
encoders, resamples each one's feature map to one `token_grid x token_grid` grid and
concatenates them on channels: `token_grid**2` tokens per view, all views in order. The dense
map for the pixel decoder is taken from the global view (view 0) of the same forward pass.
Each encoder normalises the [0, 1] pixels with its own pretraining mean / std here, so the data
pipeline never needs to know which encoders the model uses.

Resampling to the token grid is `jax.image.resize(method="linear", antialias=True)`: a triangle
filter as wide as the scale when shrinking (e.g. 32x32 DINOv2 patches -> 16x16), plain bilinear
when growing (e.g. 14x14 ConvNeXt cells -> 16x16).

Config: `get_config(...).model.vision` (configs/fusion.py).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from earthgptx_jax.models import convnext as convnext_lib
from earthgptx_jax.models import vit as vit_lib

Array = jax.Array
DENSE_SOURCES = ("convnext", "dino", "mixed")


def token_channels(config: ml_collections.ConfigDict) -> int:
  """C_mix: channels of each image token (ConvNeXt stage width + DINOv2 width)."""
  return config.convnext.dims[config.convnext_stage] + config.dino.hidden_size


def dense_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(h, w, C_dense) of the dense map the pixel decoder receives."""
  s = config.image_size
  if config.dense_source == "convnext":
    stride = convnext_lib.total_stride(config.convnext, config.dense_stage)
    return s // stride, s // stride, config.convnext.dims[config.dense_stage]
  if config.dense_source == "dino":
    grid = s // config.dino.patch_size
    return grid, grid, config.dino.hidden_size
  if config.dense_source == "mixed":
    return config.token_grid, config.token_grid, token_channels(config)
  raise ValueError(f"model.vision.dense_source: unknown value {config.dense_source!r}; expected "
                   f"one of {DENSE_SOURCES}")


def _normalise(x: Array, mean, std) -> Array:
  return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


def _to_grid(x: Array, grid: int) -> Array:
  """[N, h, w, C] -> [N, grid, grid, C]."""
  if x.shape[1:3] == (grid, grid):
    return x
  return jax.image.resize(x, (x.shape[0], grid, grid, x.shape[3]), method="linear",
                          antialias=True)


class VisionOutput(NamedTuple):
  tokens: jax.Array  # [B, V * G*G, C_mix], all views in order
  dense: jax.Array  # [B, h, w, C_d], the global view's map for the pixel decoder
  global_stages: tuple[jax.Array, ...]  # the global view's ConvNeXt stages, [B, h_i, w_i, C_i]


class MixedVisionEncoder(nn.Module):
  """pixel_values [B, V, S, S, 3] in [0, 1] -> VisionOutput.

  G = token_grid, C_mix = `token_channels(config)`, (h, w, C_d) = `dense_shape(config)`.
  """
  config: ml_collections.ConfigDict

  def setup(self):
    cfg = self.config
    if cfg.dense_source not in DENSE_SOURCES:
      raise ValueError(f"model.vision.dense_source: unknown value {cfg.dense_source!r}; "
                       f"expected one of {DENSE_SOURCES}")
    self.convnext = convnext_lib.ConvNeXt(cfg.convnext)
    self.dino = vit_lib.ViT(cfg.dino)

  def __call__(self, pixel_values: Array) -> tuple[Array, Array]:
    cfg = self.config
    s, g = cfg.image_size, cfg.token_grid
    if pixel_values.ndim != 5 or pixel_values.shape[2:] != (s, s, 3):
      raise ValueError(f"pixel_values: expected [B, V, {s}, {s}, 3], got {pixel_values.shape}")
    b, v = pixel_values.shape[:2]
    x = pixel_values.reshape(b * v, s, s, 3).astype(jnp.float32)
    stages = self.convnext(_normalise(x, cfg.convnext.image_mean, cfg.convnext.image_std)).stages
    dino = self.dino(_normalise(x, cfg.dino.image_mean, cfg.dino.image_std),
                     feature_layer=cfg.dino_layer)
    dino_map = dino.patch_tokens.reshape(b * v, *dino.grid, -1)
    conv_map = stages[cfg.convnext_stage]
    mixed = jnp.concatenate([_to_grid(conv_map, g), _to_grid(dino_map, g).astype(conv_map.dtype)],
                            axis=-1)  # [B*V, G, G, C_mix]
    tokens = mixed.reshape(b, v * g * g, mixed.shape[-1])
    tokens = nn.with_logical_constraint(tokens, ("activation_batch", "activation_length",
                                                 "activation_embed"))
    if cfg.dense_source == "convnext":
      dense = stages[cfg.dense_stage]
    elif cfg.dense_source == "dino":
      dense = dino_map
    else:
      dense = mixed
    dense = dense.reshape(b, v, *dense.shape[1:])[:, 0]
    dense = nn.with_logical_constraint(dense, ("activation_batch", None, None, "activation_embed"))
    global_stages = tuple(m.reshape(b, v, *m.shape[1:])[:, 0] for m in stages)
    return VisionOutput(tokens, dense, global_stages)
