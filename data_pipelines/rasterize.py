"""The one visual-prompt rasteriser, shared by the data pipeline and inference.

A visual prompt is given in pixel coordinates of the ORIGINAL image and is drawn into any view
(the global view, a zoom tile, the prompt map) from that view's affine, so a prompt looks the
same to the model whether it came from a training record or from a user at inference time.

Coordinate convention (the one `views.py`, COCO boxes and SAM use): coordinates are continuous,
pixel (row i, column j) covers [j, j+1) x [i, i+1) and its centre is (j + 0.5, i + 0.5). An
image of height H and width W covers [0, W) x [0, H). `affine` ([2, 3]) maps original (x, y, 1)
to view (x, y) in the same convention.

Drawing rules (each view independently; a view pixel is lit, value 1, or not, value 0):
  * point: the one pixel that contains the mapped point (none if it falls outside the view).
  * box: the pixels whose centres lie in the mapped box, half-open [x1, x2) x [y1, y2), so a box
    covers exactly its pixels at every scale and abutting boxes never overlap. Under an affine
    with rotation or shear the box is drawn as a polygon.
  * polygon: the pixels whose centres lie inside (even-odd rule, half-open on the right edge).
  * scribble: a polyline stroked with `width` (original pixels, scaled with the view's linear
    scale); pixels whose centres lie within width/2 of the polyline, width never below one view
    pixel so a stroke stays connected in coarse views.
  * mask: a binary mask of the original image, sampled at each view pixel's centre (nearest).
  Sub-pixel prompts never vanish: when a box / polygon / scribble / mask overlaps a view but no
  pixel centre falls inside it, the pixel containing the centre of its (clipped) bounds is lit.

Validation (`Prompt` on construction, `Prompt.clip_to_image` and `prepare_prompts` against the
image): unknown kinds, wrong shapes, NaN / infinite values, x2 < x1 or y2 < y1, polygons with
fewer than 3 vertices or zero area, empty scribbles, non-positive widths, empty masks, a prompt
entirely outside the image and more prompts than `max_prompts` raise ValueError naming the
prompt. A box partly outside the image is clipped to the image; polygons and scribbles partly
outside keep their vertices (their geometry is clipped per view when drawn); points must lie in
the image.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from earthgptx_jax import template

KINDS: tuple[str, ...] = ("point", "box", "polygon", "scribble", "mask")
# Values of the batch field `prompt_type` (see earthgptx_jax/batch.py).
POINT, BOX, FREE_FORM = 0, 1, 2
PROMPT_TYPE = {"point": POINT, "box": BOX, "polygon": FREE_FORM, "scribble": FREE_FORM,
               "mask": FREE_FORM}

# Mapped coordinates are rounded to this many decimals (1e-4 view pixels) before pixel-centre
# comparisons, so a coordinate that lands on a pixel centre up to float error (float32 affines
# from views.py included) counts as exactly there and ties resolve by the half-open rule.
_DECIMALS = 4


@dataclasses.dataclass(frozen=True, eq=False)
class Prompt:
  """One visual prompt in original-image pixel coordinates.

  Attributes:
    kind: one of KINDS.
    coords: point (2,) x, y; box (4,) x1, y1, x2, y2; polygon (N >= 3, 2); scribble (N >= 1, 2)
      polyline vertices; mask: unused (shape (0, 2)).
    width: scribble stroke width in original pixels (> 0); ignored otherwise.
    mask: for kind "mask", a 2-D boolean array [H, W] of the original image; None otherwise.
    name: how errors refer to this prompt, e.g. "<vp2>".
  """
  kind: str
  coords: Any = ()
  width: float = 0.0
  mask: Any = None
  name: str = "prompt"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"visual prompt {self.name}: kind must be one of {KINDS}, "
                       f"got {self.kind!r}")
    where = f"visual prompt {self.name} ({self.kind})"
    if self.kind == "mask":
      if self.mask is None:
        raise ValueError(f"{where}: mask is required")
      mask = np.asarray(self.mask)
      if mask.ndim != 2:
        raise ValueError(f"{where}: mask must be 2-D [H, W], got shape {mask.shape}")
      mask = mask.astype(bool) if mask.dtype == bool else _binary(mask, where)
      if not mask.any():
        raise ValueError(f"{where}: mask is empty (no pixel set)")
      object.__setattr__(self, "mask", mask)
      object.__setattr__(self, "coords", np.zeros((0, 2)))
      return
    if self.mask is not None:
      raise ValueError(f"{where}: mask is only for kind 'mask'")
    try:
      coords = np.asarray(self.coords, dtype=np.float64)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{where}: coords must be numbers, got {self.coords!r}") from e
    expected = {"point": "(2,)", "box": "(4,)", "polygon": "(N, 2)", "scribble": "(N, 2)"}
    if self.kind in ("polygon", "scribble"):
      if coords.size == 0:
        what = "empty scribble" if self.kind == "scribble" else "empty polygon"
        raise ValueError(f"{where}: {what} (no vertices)")
      ok = coords.ndim == 2 and coords.shape[1] == 2
    else:
      ok = coords.shape == ((2,) if self.kind == "point" else (4,))
    if not ok:
      raise ValueError(f"{where}: coords must have shape {expected[self.kind]}, "
                       f"got {coords.shape}")
    if not np.all(np.isfinite(coords)):
      raise ValueError(f"{where}: coordinates must be finite, got {coords.tolist()}")
    if self.kind == "box":
      x1, y1, x2, y2 = coords
      if x2 < x1 or y2 < y1:
        raise ValueError(f"{where}: expected x1 <= x2 and y1 <= y2, got {coords.tolist()}")
    if self.kind == "polygon":
      if len(coords) < 3:
        raise ValueError(f"{where}: needs at least 3 vertices, got {len(coords)}")
      if shoelace_area(coords) == 0.0:
        raise ValueError(f"{where}: polygon has zero area: {coords.tolist()}")
    if self.kind == "scribble":
      if not (math.isfinite(self.width) and self.width > 0):
        raise ValueError(f"{where}: width must be a positive number of pixels, "
                         f"got {self.width}")
    object.__setattr__(self, "coords", coords)
    object.__setattr__(self, "width", float(self.width))

  @property
  def type_id(self) -> int:
    """The batch's `prompt_type` value: 0 point, 1 box, 2 free-form."""
    return PROMPT_TYPE[self.kind]

  def bounds(self) -> np.ndarray:
    """(x1, y1, x2, y2) in original pixels; scribbles include half their width."""
    if self.kind == "mask":
      rows, cols = np.nonzero(self.mask)
      return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], np.float64)
    if self.kind == "point":
      return np.concatenate([self.coords, self.coords])
    if self.kind == "box":
      return self.coords.copy()
    lo, hi = self.coords.min(0), self.coords.max(0)
    pad = self.width / 2 if self.kind == "scribble" else 0.0
    return np.concatenate([lo - pad, hi + pad])

  def clip_to_image(self, height: int, width: int) -> Prompt:
    """This prompt checked against an image [0, width) x [0, height); boxes clipped to it.

    Raises ValueError naming the prompt when it lies entirely outside the image, when a point
    is outside, or when a mask's shape differs from the image's.
    """
    where = f"visual prompt {self.name} ({self.kind})"
    if self.kind == "mask":
      if self.mask.shape != (height, width):
        raise ValueError(f"{where}: mask shape {self.mask.shape} differs from the image "
                         f"(height, width) = {(height, width)}")
      return self
    if self.kind == "point":
      x, y = self.coords
      if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"{where}: ({x}, {y}) is outside the image "
                         f"[0, {width}) x [0, {height})")
      return self
    x1, y1, x2, y2 = self.bounds()
    # Entirely outside: no overlap of positive extent (a degenerate box may sit on a line).
    outside = (x1 >= width or y1 >= height or x2 < 0 or y2 < 0
               or (x2 == 0 and x1 < 0) or (y2 == 0 and y1 < 0))
    if outside:
      raise ValueError(f"{where}: bounds {[x1, y1, x2, y2]} lie entirely outside the image "
                       f"[0, {width}) x [0, {height})")
    if self.kind != "box":
      return self
    clipped = np.array([max(x1, 0.0), max(y1, 0.0), min(x2, width), min(y2, height)])
    return dataclasses.replace(self, coords=clipped)


def _binary(mask: np.ndarray, where: str) -> np.ndarray:
  values = np.unique(mask)
  if not np.all(np.isin(values, (0, 1, 255))):
    raise ValueError(f"{where}: mask must be binary (0/1, 0/255 or bool), got values "
                     f"{values[:8].tolist()}")
  return mask > 0


def shoelace_area(vertices: np.ndarray) -> float:
  """Area of a simple polygon [N, 2] (absolute value of the shoelace sum)."""
  x, y = np.asarray(vertices, np.float64).T
  return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def as_prompt(prompt: Prompt | Mapping[str, Any], name: str | None = None) -> Prompt:
  """A Prompt from a Prompt or a record dict {kind, coords, width?, mask?, name?}."""
  if isinstance(prompt, Prompt):
    return prompt if name is None else dataclasses.replace(prompt, name=name)
  if not isinstance(prompt, Mapping):
    raise ValueError(f"visual prompt {name or '?'}: expected a Prompt or a dict, "
                     f"got {type(prompt).__name__}")
  unknown = set(prompt) - {"kind", "coords", "width", "mask", "name"}
  if unknown:
    raise ValueError(f"visual prompt {name or prompt.get('name', '?')}: unknown fields "
                     f"{sorted(unknown)}")
  if "kind" not in prompt:
    raise ValueError(f"visual prompt {name or prompt.get('name', '?')}: missing field 'kind'")
  fields = dict(prompt)
  if name is not None:
    fields["name"] = name
  return Prompt(**fields)


def prepare_prompts(prompts: Sequence[Prompt | Mapping[str, Any]], image_size: Sequence[int],
                    max_prompts: int) -> list[Prompt]:
  """Validates an example's prompts against its image; names them <vp1>, <vp2>, ...

  Args:
    prompts: in placeholder order (the k-th is `<vpk>` in the conversation).
    image_size: original (height, width).
    max_prompts: config.model.prompt.max_prompts.
  Returns:
    Prompts named by placeholder, boxes clipped to the image.
  """
  if len(prompts) > max_prompts:
    raise ValueError(f"visual prompts: got {len(prompts)}, more than max_prompts={max_prompts}; "
                     f"prompt {template.vp_placeholder(max_prompts + 1)} onwards has no slot")
  height, width = (int(v) for v in image_size)
  return [as_prompt(p, template.vp_placeholder(k + 1)).clip_to_image(height, width)
          for k, p in enumerate(prompts)]


# ----------------------------------------------------------------------------------------------
# Drawing.


def _check_view(affine, size) -> tuple[np.ndarray, int]:
  affine = np.asarray(affine, np.float64)
  if affine.shape != (2, 3) or not np.all(np.isfinite(affine)):
    raise ValueError(f"affine: expected a finite [2, 3] matrix, got {affine.tolist()}")
  if abs(np.linalg.det(affine[:, :2])) == 0:
    raise ValueError(f"affine: linear part is singular: {affine.tolist()}")
  if int(size) != size or size <= 0:
    raise ValueError(f"size: expected a positive integer, got {size}")
  return affine, int(size)


def _apply(affine: np.ndarray, xy: np.ndarray) -> np.ndarray:
  return np.round(xy @ affine[:, :2].T + affine[:, 2], _DECIMALS)


def _is_axis_aligned(affine: np.ndarray) -> bool:
  return affine[0, 1] == 0 and affine[1, 0] == 0


def _centre_span(lo: float, hi: float) -> tuple[int, int]:
  """Pixel indices [a, b) whose centres c = i + 0.5 satisfy lo <= c < hi."""
  return math.ceil(lo - 0.5), math.ceil(hi - 0.5)


def _draw_box(out: np.ndarray, box: np.ndarray) -> None:
  size = out.shape[0]
  j0, j1 = _centre_span(box[0], box[2])
  i0, i1 = _centre_span(box[1], box[3])
  out[max(i0, 0):max(min(i1, size), 0), max(j0, 0):max(min(j1, size), 0)] = 1


def _draw_polygon(out: np.ndarray, vertices: np.ndarray) -> None:
  """Even-odd fill through pixel centres, exact for the centre rule, vectorised over rows.

  Pixel (i, j) is inside when an odd number of the edges crossing the scanline y = i + 0.5
  do so at x <= j + 0.5, i.e. at a crossing whose first pixel ceil(x - 0.5) is <= j: a
  histogram of those first pixels per row, cumulated (mod 2) along the row, counts them.
  """
  size = out.shape[0]
  p, q = vertices, np.roll(vertices, -1, axis=0)
  centres = np.arange(size)[:, None] + 0.5  # [rows, 1]
  # Half-open in y, so a scanline through a vertex counts it once.
  rows, edges = np.nonzero((p[:, 1] <= centres) != (q[:, 1] <= centres))  # [crossings]
  if rows.size == 0:
    return
  a, b = p[edges], q[edges]
  xs = a[:, 0] + (rows + 0.5 - a[:, 1]) * (b[:, 0] - a[:, 0]) / (b[:, 1] - a[:, 1])
  first = np.clip(np.ceil(np.round(xs, _DECIMALS) - 0.5), 0, size).astype(np.int64)
  counts = np.zeros((size, size + 1), np.int32)
  np.add.at(counts, (rows, first), 1)
  parity = (counts[:, :size] & 1).astype(np.uint8)
  out |= np.bitwise_xor.accumulate(parity, axis=1).astype(bool)  # cumulated count, mod 2


def _draw_scribble(out: np.ndarray, vertices: np.ndarray, half_width: float) -> None:
  size = out.shape[0]
  lo = np.floor(vertices.min(0) - half_width).astype(int).clip(0, size)
  hi = np.ceil(vertices.max(0) + half_width + 1).astype(int).clip(0, size)
  if lo[0] >= hi[0] or lo[1] >= hi[1]:
    return
  cx, cy = np.meshgrid(np.arange(lo[0], hi[0]) + 0.5, np.arange(lo[1], hi[1]) + 0.5)
  dist2 = np.full(cx.shape, np.inf)
  segments = zip(vertices, vertices[1:]) if len(vertices) > 1 else [(vertices[0], vertices[0])]
  for a, b in segments:
    d = b - a
    len2 = float(d @ d)
    t = 0.0 if len2 == 0 else np.clip(((cx - a[0]) * d[0] + (cy - a[1]) * d[1]) / len2, 0, 1)
    dist2 = np.minimum(dist2, (cx - a[0] - t * d[0]) ** 2 + (cy - a[1] - t * d[1]) ** 2)
  out[lo[1]:hi[1], lo[0]:hi[0]] |= np.round(dist2, _DECIMALS) <= half_width ** 2


def _draw_mask(out: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> None:
  """Nearest sampling: each view pixel takes the original pixel under its centre."""
  size = out.shape[0]
  height, width = mask.shape
  centres = np.arange(size) + 0.5
  if _is_axis_aligned(affine):  # separable: index columns and rows once
    cols = np.floor(np.round((centres - affine[0, 2]) / affine[0, 0], _DECIMALS)).astype(int)
    rows = np.floor(np.round((centres - affine[1, 2]) / affine[1, 1], _DECIMALS)).astype(int)
    col_ok, row_ok = (cols >= 0) & (cols < width), (rows >= 0) & (rows < height)
    out[np.ix_(row_ok, col_ok)] = mask[np.ix_(rows[row_ok], cols[col_ok])]
    return
  cx, cy = np.meshgrid(centres, centres)
  inverse = np.linalg.inv(affine[:, :2])
  view = np.stack([cx.ravel() - affine[0, 2], cy.ravel() - affine[1, 2]], axis=1)
  xy = np.floor(np.round(view @ inverse.T, _DECIMALS)).astype(np.int64)
  valid = (xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height)
  flat = out.reshape(-1)
  flat[valid] = mask[xy[valid, 1], xy[valid, 0]]


def _view_bounds(prompt: Prompt, affine: np.ndarray) -> np.ndarray:
  """(x1, y1, x2, y2) of the prompt in the view frame, unclipped."""
  x1, y1, x2, y2 = prompt.bounds()
  corners = _apply(affine, np.array([[x1, y1], [x2, y1], [x1, y2], [x2, y2]]))
  return np.concatenate([corners.min(0), corners.max(0)])


def _light_centre_if_empty(out: np.ndarray, prompt: Prompt, affine: np.ndarray) -> None:
  """Keeps a sub-pixel prompt visible: lights the pixel at its clipped bounds' centre."""
  if out.any():
    return
  size = out.shape[0]
  bounds = _view_bounds(prompt, affine)
  lo, hi = np.maximum(bounds[:2], 0), np.minimum(bounds[2:], size)
  if np.any(lo > hi):
    return
  col, row = np.floor((lo + hi) / 2).astype(int)
  if 0 <= col < size and 0 <= row < size:
    out[row, col] = 1


def rasterize(prompt: Prompt | Mapping[str, Any], affine, size: int) -> np.ndarray:
  """Draws one prompt into a view.

  Args:
    prompt: a Prompt or record dict, in original-image pixel coordinates.
    affine: [2, 3], original (x, y, 1) -> view (x, y) (a view's `affine` from views.py, or
      `scale_affine` of it for a map of another size).
    size: side of the square view, pixels.
  Returns:
    [size, size] float32 map in {0, 1}; all zeros when the prompt is outside this view.
  """
  prompt = as_prompt(prompt)
  affine, size = _check_view(affine, size)
  out = np.zeros((size, size), bool)
  if prompt.kind == "point":
    col, row = np.floor(_apply(affine, prompt.coords[None])[0]).astype(int)
    if 0 <= col < size and 0 <= row < size:
      out[row, col] = 1
    return out.astype(np.float32)
  if prompt.kind == "box" and _is_axis_aligned(affine):
    _draw_box(out, _view_bounds(prompt, affine))
  elif prompt.kind == "box":
    x1, y1, x2, y2 = prompt.coords
    _draw_polygon(out, _apply(affine, np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]])))
  elif prompt.kind == "polygon":
    _draw_polygon(out, _apply(affine, prompt.coords))
  elif prompt.kind == "scribble":
    scale = math.sqrt(abs(np.linalg.det(affine[:, :2])))
    _draw_scribble(out, _apply(affine, prompt.coords), max(prompt.width * scale / 2, 0.5))
  else:
    _draw_mask(out, prompt.mask, affine)
  _light_centre_if_empty(out, prompt, affine)
  return out.astype(np.float32)


def prompt_geometry(prompt: Prompt | Mapping[str, Any], affine, size: int) -> np.ndarray:
  """(x1, y1, x2, y2) of the prompt's bounds in the view, divided by `size`, clipped to [0, 1].

  Points give (x, y, x, y); free-form prompts their bounds (scribbles including half their
  width). This is the batch's `prompt_geometry` when `affine` is the global view's.
  """
  prompt = as_prompt(prompt)
  affine, size = _check_view(affine, size)
  return np.clip(_view_bounds(prompt, affine) / size, 0.0, 1.0).astype(np.float32)


def scale_affine(affine, factor: float) -> np.ndarray:
  """The affine of the same view resampled by `factor` (e.g. map_size / image_size)."""
  return np.asarray(affine, np.float64) * factor


def prompt_fields(prompts: Sequence[Prompt | Mapping[str, Any]], image_size: Sequence[int],
                  global_affine, view_size: int, map_size: int,
                  max_prompts: int) -> dict[str, np.ndarray]:
  """One example's prompt fields of the batch (earthgptx_jax/batch.py), padded to max_prompts.

  Args:
    prompts: the example's prompts in placeholder order.
    image_size: original (height, width).
    global_affine: [2, 3] the global view's affine (original -> global view of side view_size).
    view_size: S, side of the global view.
    map_size: M, side of a prompt map.
    max_prompts: P.
  Returns:
    prompt_maps [P, M, M] float32, prompt_geometry [P, 4] float32, prompt_type [P] int32,
    prompt_valid [P] bool; padding slots are zeros / False.
  """
  prompts = prepare_prompts(prompts, image_size, max_prompts)
  map_affine = scale_affine(global_affine, map_size / view_size)
  maps = np.zeros((max_prompts, map_size, map_size), np.float32)
  geometry = np.zeros((max_prompts, 4), np.float32)
  types = np.zeros((max_prompts,), np.int32)
  valid = np.zeros((max_prompts,), bool)
  for k, prompt in enumerate(prompts):
    maps[k] = rasterize(prompt, map_affine, map_size)
    geometry[k] = prompt_geometry(prompt, global_affine, view_size)
    types[k] = prompt.type_id
    valid[k] = True
  return dict(prompt_maps=maps, prompt_geometry=geometry, prompt_type=types,
              prompt_valid=valid)
