"""Zoom-out / zoom-in views of one image: their pixels, and masks resampled between them and the
original.

EarthGPT-X sees a large remote-sensing scene twice: a global view (the whole scene, shrunk)
and a grid of zoomed tiles (crops at encoder resolution), so that small targets keep their
pixels. Every view comes with a 2x3 affine `A` mapping original pixel coordinates to view pixel
coordinates; prompts, boxes and masks move between frames only through `A` and its inverse.
Where the views lie, the affines and box mapping (and the coordinate convention) are
`earthgptx_jax/geometry.py`, shared with the models; this module resamples pixels.

Unused tile slots up to `max_tiles` are zero pixels with `valid = False`. Pixels are resampled
with PIL's bicubic filter (antialiased when shrinking, as CLIP / DINOv2 preprocessing do) and
clipped back to [0, 1].
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image

from earthgptx_jax import geometry


class Views(NamedTuple):
  pixels: np.ndarray  # [V, S, S, 3] float32 in [0, 1]; V = 1 + max_tiles
  valid: np.ndarray  # [V] bool; False for padding tiles
  affine: np.ndarray  # [V, 2, 3] float32; original (x, y, 1) -> view (x, y)


def make_views(image: np.ndarray, image_size: int, max_tiles: int) -> Views:
  """image: [H, W, 3] float in [0, 1] -> Views with V = 1 + max_tiles views of S x S."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image: expected shape [H, W, 3], got {image.shape}")
  if not np.issubdtype(image.dtype, np.floating):
    raise ValueError(f"image: expected a float array in [0, 1] (see preprocess.py), got dtype "
                     f"{image.dtype}")
  if image_size <= 0:
    raise ValueError(f"image_size: must be positive, got {image_size}")
  height, width = image.shape[:2]
  affines, valid, boxes = geometry.view_affines(height, width, image_size, max_tiles)
  s = image_size
  pixels = np.zeros([1 + max_tiles, s, s, 3], np.float32)
  new_h, new_w = geometry.global_view_shape(height, width, s)
  pixels[0, :new_h, :new_w] = _resize(image, boxes[0], (new_h, new_w))
  for n, box in enumerate(boxes[1:], start=1):
    pixels[n] = _resize(image, box, (s, s))
  return Views(pixels=pixels, valid=valid, affine=affines)


def _resize(image: np.ndarray, box: tuple[float, float, float, float], out_hw: tuple[int, int]
            ) -> np.ndarray:
  """Resamples the `box` region of `image` [H, W, C] to `out_hw`, bicubic, clipped to [0, 1]."""
  channels = []
  for c in range(image.shape[-1]):
    band = Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32))
    band = band.resize((out_hw[1], out_hw[0]), Image.Resampling.BICUBIC, box=box)
    channels.append(np.asarray(band))
  return np.clip(np.stack(channels, axis=-1), 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Masks between frames.


def warp_to_view(array: np.ndarray, affine: np.ndarray, image_size: int, *, order: int = 1
                 ) -> np.ndarray:
  """array [H, W, ...] in the original frame -> [S, S, ...] in a view (0 outside the image).

  Samples at view pixel centres; `order` 0 (nearest: label masks) or 1 (bilinear: soft masks,
  prompt maps).
  """
  return _sample(array, geometry.invert_affine(affine), (image_size, image_size), order)


def warp_to_original(array: np.ndarray, affine: np.ndarray, image_hw: tuple[int, int], *,
                     order: int = 1) -> np.ndarray:
  """array [S, S, ...] in a view -> [H, W, ...] in the original frame (0 outside the view).

  For the global view this is SAM's post-processing (drop the padding, resize back); use
  `order=1` on mask logits and threshold afterwards.
  """
  return _sample(array, np.asarray(affine, np.float64), tuple(image_hw), order)


def _sample(array: np.ndarray, dst_to_src: np.ndarray, out_hw: tuple[int, int], order: int
            ) -> np.ndarray:
  """Resamples `array` [h, w, ...] on an `out_hw` grid whose pixel centres map by dst_to_src."""
  array = np.asarray(array)
  if array.ndim < 2 or 0 in array.shape[:2]:
    raise ValueError(f"array: expected a non-empty [H, W, ...] array, got shape {array.shape}")
  if order not in (0, 1):
    raise ValueError(f"order: expected 0 (nearest) or 1 (bilinear), got {order}")
  h, w = array.shape[:2]
  ys, xs = np.meshgrid(np.arange(out_hw[0]) + 0.5, np.arange(out_hw[1]) + 0.5, indexing="ij")
  src = geometry.apply_affine(np.stack([xs, ys], axis=-1), dst_to_src)
  sx, sy = src[..., 0], src[..., 1]
  inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
  extra = (slice(None),) * 2 + (None,) * (array.ndim - 2)
  if order == 0:
    out = array[np.clip(np.floor(sy).astype(int), 0, h - 1),
                np.clip(np.floor(sx).astype(int), 0, w - 1)]
  else:
    fx, fy = sx - 0.5, sy - 0.5  # index space: pixel centres at integers
    x0, y0 = np.floor(fx), np.floor(fy)
    wx = (fx - x0).astype(np.float32)[extra]
    wy = (fy - y0).astype(np.float32)[extra]
    x0, y0 = x0.astype(int), y0.astype(int)
    xa, xb = np.clip(x0, 0, w - 1), np.clip(x0 + 1, 0, w - 1)
    ya, yb = np.clip(y0, 0, h - 1), np.clip(y0 + 1, 0, h - 1)
    values = array.astype(np.float32)
    out = ((1 - wy) * ((1 - wx) * values[ya, xa] + wx * values[ya, xb])
           + wy * ((1 - wx) * values[yb, xa] + wx * values[yb, xb]))
  return np.where(inside[extra], out, np.zeros((), out.dtype))
