"""Where each view of an image lies in the original, as 2x3 affines, and boxes moved between the
frames: the pure geometry that the data pipeline (data_pipelines/views.py, which resamples the
pixels), the models and inference share.

Coordinate convention (continuous, "pixel edges"): pixel (row i, column j) covers
[j, j + 1) x [i, i + 1), its centre is (j + 0.5, i + 0.5), and an image of width W spans
x in [0, W]. A box (x1, y1, x2, y2) in this convention maps to a view by mapping its corners.

Views (the contract in `earthgptx_jax/batch.py`):
  * view 0, global: the image resized so its longest side is S (SAM's `get_preprocess_shape`:
    new side = int(side * S / max(H, W) + 0.5)), padded bottom / right with zeros to S x S.
  * views 1..T: the original split into a `rows x cols` grid chosen by `select_grid`, each
    cell resized to S x S (cells are stretched when not square). Unused slots up to
    `max_tiles` carry the global view's affine, so batched code never meets a singular matrix.
Every affine `A` maps original pixel coordinates (x, y, 1) to view pixel coordinates (x, y).
"""

from __future__ import annotations

import math

import numpy as np


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


def _check_size(height: int, width: int) -> None:
  if height <= 0 or width <= 0:
    raise ValueError(f"image size: height and width must be positive, got ({height}, {width})")
