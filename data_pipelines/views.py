"""Zoom-out / zoom-in views of one image, and the affine maps between them and the original.

EarthGPT-X sees a large remote-sensing scene twice: a global view (the whole scene, shrunk)
and a grid of zoomed tiles (crops at encoder resolution), so that small targets keep their
pixels. Every view comes with a 2x3 affine `A` mapping original pixel coordinates to view pixel
coordinates; prompts, boxes and masks move between frames only through `A` and its inverse.

Coordinate convention (continuous, "pixel edges"): pixel (row i, column j) covers
[j, j + 1) x [i, i + 1), its centre is (j + 0.5, i + 0.5), and an image of width W spans
x in [0, W]. A box (x1, y1, x2, y2) in this convention maps to a view by mapping its corners.

Geometry (the contract in `earthgptx_jax/batch.py`):
  * view 0, global: the image resized so its longest side is S (SAM's `get_preprocess_shape`:
    new side = int(side * S / max(H, W) + 0.5)), padded bottom / right with zeros to S x S.
  * views 1..T: the original split into a `rows x cols` grid chosen by `select_grid`, each
    cell resized to S x S (cells are stretched when not square). Unused slots up to
    `max_tiles` are zero pixels with `valid = False` and carry the global view's affine, so
    batched code never meets a singular matrix.
Pixels are resampled with PIL's bicubic filter (antialiased when shrinking, as CLIP / DINOv2
preprocessing do) and clipped back to [0, 1].
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from PIL import Image


class Views(NamedTuple):
  pixels: np.ndarray  # [V, S, S, 3] float32 in [0, 1]; V = 1 + max_tiles
  valid: np.ndarray  # [V] bool; False for padding tiles
  affine: np.ndarray  # [V, 2, 3] float32; original (x, y, 1) -> view (x, y)


def global_view_shape(height: int, width: int, image_size: int) -> tuple[int, int]:
  """(new_h, new_w) of the resized image inside the global view, as SAM computes it."""
  scale = image_size / max(height, width)
  return int(height * scale + 0.5), int(width * scale + 0.5)


def select_grid(height: int, width: int, max_tiles: int) -> tuple[int, int]:
  """Tile grid (rows, cols) for an image, or (0, 0) when `max_tiles` is 0.

  Among grids with 2 <= rows * cols <= max_tiles (only 1x1 when max_tiles is 1; a 1x1 grid
  otherwise repeats the global view), picks the one whose aspect ratio cols / rows is closest
  to width / height in log space; ties go to more tiles (more zoom), then to the orientation
  of the image (cols >= rows for landscape or square images).
  """
  _check_size(height, width)
  if max_tiles < 0:
    raise ValueError(f"max_tiles: must be >= 0, got {max_tiles}")
  if max_tiles == 0:
    return 0, 0
  if max_tiles == 1:
    return 1, 1
  target = math.log(width / height)
  landscape = width >= height

  def key(grid):
    rows, cols = grid
    error = round(abs(target - math.log(cols / rows)), 9)
    wrong_orientation = rows > cols if landscape else cols > rows
    return error, -rows * cols, wrong_orientation

  grids = [(r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1)
           if 2 <= r * c <= max_tiles]
  return min(grids, key=key)


def view_affines(height: int, width: int, image_size: int, max_tiles: int
                 ) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float, float, float]]]:
  """Affines [V, 2, 3], valid [V], and the source box (x0, y0, x1, y1) of each valid view."""
  _check_size(height, width)
  s = image_size
  new_h, new_w = global_view_shape(height, width, s)
  global_affine = np.array([[new_w / width, 0.0, 0.0], [0.0, new_h / height, 0.0]])
  affines = np.repeat(global_affine[None], 1 + max_tiles, axis=0)
  valid = np.zeros([1 + max_tiles], bool)
  valid[0] = True
  boxes = [(0.0, 0.0, float(width), float(height))]
  rows, cols = select_grid(height, width, max_tiles)
  tile_w, tile_h = width / max(cols, 1), height / max(rows, 1)
  for n in range(rows * cols):
    r, c = divmod(n, cols)
    x0, y0 = c * tile_w, r * tile_h
    affines[1 + n] = [[s / tile_w, 0.0, -x0 * s / tile_w], [0.0, s / tile_h, -y0 * s / tile_h]]
    valid[1 + n] = True
    boxes.append((x0, y0, x0 + tile_w, y0 + tile_h))
  return affines.astype(np.float32), valid, boxes


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
  affines, valid, boxes = view_affines(height, width, image_size, max_tiles)
  s = image_size
  pixels = np.zeros([1 + max_tiles, s, s, 3], np.float32)
  new_h, new_w = global_view_shape(height, width, s)
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
# Coordinates and masks between frames.


def invert_affine(affine: np.ndarray) -> np.ndarray:
  """[..., 2, 3] -> [..., 2, 3], the inverse map (view -> original for a view's affine)."""
  affine = np.asarray(affine, np.float64)
  linear, shift = affine[..., :2], affine[..., 2:]
  det = np.linalg.det(linear)
  if np.any(np.abs(det) < 1e-12):
    raise ValueError(f"affine: singular matrix (determinant {det}) cannot be inverted")
  inv = np.linalg.inv(linear)
  return np.concatenate([inv, -inv @ shift], axis=-1)


def apply_affine(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """points [..., 2] (x, y) mapped by affine [2, 3]."""
  points = np.asarray(points, np.float64)
  affine = np.asarray(affine, np.float64)
  if points.shape[-1] != 2:
    raise ValueError(f"points: expected last dimension 2 (x, y), got shape {points.shape}")
  if affine.shape != (2, 3):
    raise ValueError(f"affine: expected shape (2, 3), got {affine.shape}")
  return points @ affine[:, :2].T + affine[:, 2]


def boxes_to_view(boxes: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """boxes [..., 4] (x1, y1, x2, y2) in the original -> the same boxes in a view."""
  boxes = np.asarray(boxes, np.float64)
  if boxes.shape[-1] != 4:
    raise ValueError(f"boxes: expected last dimension 4 (x1, y1, x2, y2), got {boxes.shape}")
  corners = apply_affine(boxes.reshape(boxes.shape[:-1] + (2, 2)), affine)
  return np.concatenate([corners.min(-2), corners.max(-2)], axis=-1)


def boxes_to_original(boxes: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """boxes [..., 4] in a view -> the original frame (inverse of `boxes_to_view`)."""
  return boxes_to_view(boxes, invert_affine(affine))


def warp_to_view(array: np.ndarray, affine: np.ndarray, image_size: int, *, order: int = 1
                 ) -> np.ndarray:
  """array [H, W, ...] in the original frame -> [S, S, ...] in a view (0 outside the image).

  Samples at view pixel centres; `order` 0 (nearest: label masks) or 1 (bilinear: soft masks,
  prompt maps).
  """
  return _sample(array, invert_affine(affine), (image_size, image_size), order)


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
  src = apply_affine(np.stack([xs, ys], axis=-1), dst_to_src)
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


def _check_size(height: int, width: int) -> None:
  if height <= 0 or width <= 0:
    raise ValueError(f"image size: height and width must be positive, got ({height}, {width})")
