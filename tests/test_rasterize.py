"""The visual-prompt rasteriser: exact pixels in every view, geometry, and clear errors."""

from fractions import Fraction

import numpy as np
import pytest

from data_pipelines import rasterize as R
from data_pipelines import views
from earthgptx_jax import geometry as geometry_lib

# (scale, shift): dyadic / small-denominator scales whose affines are exact in float64, plus
# the shifts of zoom tiles.
EXACT_VIEWS = [(Fraction(1), Fraction(0)), (Fraction(2), Fraction(0)),
               (Fraction(1, 2), Fraction(0)), (Fraction(1, 4), Fraction(3)),
               (Fraction(3, 4), Fraction(-5)), (Fraction(3, 2), Fraction(-7)),
               (Fraction(4), Fraction(-40)), (Fraction(1, 10), Fraction(0))]


def _affine(scale, shift_x, shift_y=None) -> np.ndarray:
  shift_y = shift_x if shift_y is None else shift_y
  return np.array([[float(scale), 0, float(shift_x)], [0, float(scale), float(shift_y)]])


def _centre_rule(lo, hi, scale, shift, size) -> np.ndarray:
  """[size] bool: view pixels whose centres map back (exactly, in rationals) into [lo, hi)."""
  return np.array([Fraction(lo) <= (Fraction(2 * j + 1, 2) - shift) / scale < Fraction(hi)
                   for j in range(size)])


@pytest.mark.parametrize("scale,shift", EXACT_VIEWS)
def test_box_covers_exactly_its_pixels_at_every_scale(scale, shift):
  size = 48
  for box in [(3, 5, 17, 9), (0, 0, 40, 40), (11, 2, 12, 30), (20, 21, 37, 38)]:
    got = R.rasterize(R.Prompt("box", box), _affine(scale, shift), size)
    cols = _centre_rule(box[0], box[2], scale, shift, size)
    rows = _centre_rule(box[1], box[3], scale, shift, size)
    want = np.outer(rows, cols)
    if not want.any():  # sub-pixel in this view: at most the one pixel that keeps it visible
      assert got.sum() <= 1
      continue
    np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=f"{box} s={scale}")


def test_box_at_integer_scales_is_the_scaled_block():
  box = (3, 5, 17, 9)
  for s in (1, 2, 3):
    want = np.zeros((64, 64), np.float32)
    want[5 * s:9 * s, 3 * s:17 * s] = 1
    np.testing.assert_array_equal(R.rasterize({"kind": "box", "coords": box}, _affine(s, 0), 64),
                                  want)


def test_box_matches_the_centre_rule_on_random_float_views():
  rng = np.random.default_rng(0)
  for _ in range(50):
    scale, shift_x, shift_y = rng.uniform(0.05, 5), rng.uniform(-30, 5), rng.uniform(-30, 5)
    x1, y1 = rng.uniform(0, 40, 2)
    x2, y2 = x1 + rng.uniform(2, 40), y1 + rng.uniform(2, 40)
    got = R.rasterize(R.Prompt("box", (x1, y1, x2, y2)), _affine(scale, shift_x, shift_y), 40)
    centres = np.arange(40) + 0.5
    cols = (x1 <= (centres - shift_x) / scale) & ((centres - shift_x) / scale < x2)
    rows = (y1 <= (centres - shift_y) / scale) & ((centres - shift_y) / scale < y2)
    if np.outer(rows, cols).any():
      np.testing.assert_array_equal(got, np.outer(rows, cols).astype(np.float32))


def test_box_in_the_views_of_a_real_sized_image():
  """Views from views.py (float32 affines): global view and each zoom tile."""
  height, width = 512, 640  # HIT-UAV frame size
  affines, valid, _ = geometry_lib.view_affines(height, width, image_size=64, max_tiles=4)
  box = (101.3, 57.7, 333.1, 290.2)
  for affine in affines[valid]:
    got = R.rasterize(R.Prompt("box", box), affine, 64)
    a = affine.astype(np.float64)
    centres = np.arange(64) + 0.5
    ox, oy = (centres - a[0, 2]) / a[0, 0], (centres - a[1, 2]) / a[1, 1]
    want = np.outer((box[1] <= oy) & (oy < box[3]), (box[0] <= ox) & (ox < box[2]))
    np.testing.assert_array_equal(got, want.astype(np.float32))


@pytest.mark.parametrize("scale,shift", EXACT_VIEWS)
def test_point_lands_on_its_pixel(scale, shift):
  size = 64
  for x, y in [(0, 0), (10.5, 3.25), (17.99, 30), (31, 2.5)]:
    got = R.rasterize(R.Prompt("point", (x, y)), _affine(scale, shift), size)
    col = int(np.floor(Fraction(x) * scale + shift))
    row = int(np.floor(Fraction(y) * scale + shift))
    want = np.zeros((size, size), np.float32)
    if 0 <= col < size and 0 <= row < size:
      want[row, col] = 1
    np.testing.assert_array_equal(got, want, err_msg=f"({x}, {y}) s={scale} t={shift}")


def _star(n: int, centre, r_in: float, r_out: float, phase: float) -> np.ndarray:
  angles = np.linspace(0, 2 * np.pi, n, endpoint=False) + phase
  radii = np.where(np.arange(n) % 2 == 0, r_out, r_in)
  return np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1)


@pytest.mark.parametrize("scale", [1.0, 2.0, 0.5, 1.7])
def test_polygon_area_matches_shoelace(scale):
  polygon = _star(14, (60.3, 55.1), 18.0, 45.0, 0.3)  # concave
  area = R.shoelace_area(polygon) * scale ** 2
  perimeter = np.linalg.norm(polygon - np.roll(polygon, 1, 0), axis=1).sum() * scale
  got = R.rasterize(R.Prompt("polygon", polygon), _affine(scale, 0), 256).sum()
  # Centre sampling errs only in pixels cut by the boundary, with errors that mostly cancel.
  assert abs(got - area) <= 0.1 * perimeter, (got, area, perimeter)
  assert abs(got - area) / area < 0.03


def test_rectangle_polygon_equals_box_and_rotation_keeps_area():
  rect = np.array([[3, 5], [17, 5], [17, 9], [3, 9]])
  for scale, shift in EXACT_VIEWS[:6]:
    affine = _affine(scale, shift)
    np.testing.assert_array_equal(R.rasterize(R.Prompt("polygon", rect), affine, 48),
                                  R.rasterize(R.Prompt("box", (3, 5, 17, 9)), affine, 48))
  theta = 0.4
  rotation = np.array([[np.cos(theta), -np.sin(theta), 60], [np.sin(theta), np.cos(theta), 10]])
  box = R.rasterize(R.Prompt("box", (10, 10, 50, 40)), 1.5 * rotation, 200)
  assert abs(box.sum() - 40 * 30 * 1.5 ** 2) / (40 * 30 * 1.5 ** 2) < 0.02


def _thickness(mask: np.ndarray, col: int) -> int:
  return int(mask[:, col].sum())


def test_scribble_width_scales_with_the_view():
  stroke = R.Prompt("scribble", [(5, 10.3), (40, 10.3)], width=4)
  thickness = {s: _thickness(R.rasterize(stroke, _affine(s, 0), 128), int(20 * s))
               for s in (0.5, 1, 2, 3)}
  assert thickness[1] == 4 and thickness[2] == 8, thickness
  for s, t in thickness.items():
    assert abs(t - 4 * s) <= 1, thickness
  # A coarse view keeps the stroke at least one pixel thick and connected.
  thin = R.rasterize(stroke, _affine(0.05, 0), 16)
  assert thin.sum() >= 2 and _thickness(thin, 1) == 1


def test_scribble_diagonal_stroke_and_single_vertex():
  stroke = R.Prompt("scribble", [(2, 2), (30, 30), (30, 5)], width=3)
  got = R.rasterize(stroke, _affine(1, 0), 40)
  cx, cy = np.meshgrid(np.arange(40) + 0.5, np.arange(40) + 0.5)
  # Brute-force distance to the two segments.
  d1 = np.abs(cx - cy) / np.sqrt(2) * ((cx + cy) / 2 <= 30.0) + 1e9 * ((cx + cy) / 2 > 30.0)
  d2 = np.where((cy >= 5) & (cy <= 30), np.abs(cx - 30), 1e9)
  near_end = np.hypot(cx - 2, cy - 2)
  want = (np.minimum(np.minimum(d1, d2), near_end) <= 1.5) & ((cx + cy) / 2 >= 2 - 1.5)
  inner = (cx > 4) & (cy > 4) & (cx < 29) & (cy < 29)
  np.testing.assert_array_equal(got[inner], want[inner].astype(np.float32))
  dot = R.rasterize(R.Prompt("scribble", [(10.2, 10.7)], width=1), _affine(1, 0), 20)
  assert dot.sum() == 1 and dot[10, 10] == 1


def test_mask_samples_pixel_centres():
  rng = np.random.default_rng(1)
  mask = rng.random((24, 32)) > 0.6
  prompt = R.Prompt("mask", mask=mask)
  np.testing.assert_array_equal(R.rasterize(prompt, _affine(1, 0), 32)[:24], mask)
  np.testing.assert_array_equal(R.rasterize(prompt, _affine(2, 0), 64)[:48],
                                np.kron(mask, np.ones((2, 2))))
  np.testing.assert_array_equal(R.rasterize(prompt, _affine(0.5, 0), 16)[:12], mask[1::2, 1::2])
  # A general (non axis-aligned) affine: the transpose swaps x and y.
  transpose = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  np.testing.assert_array_equal(R.rasterize(prompt, transpose, 32)[:, :24], mask.T)


def test_real_sirst_mask_in_global_view(shared_data):
  from PIL import Image
  mask = np.asarray(Image.open(shared_data / "SIRST/masks/Misc_103_pixels0.png").convert("L"))
  prompt = R.prepare_prompts([{"kind": "mask", "coords": (), "mask": mask}], mask.shape, 2)[0]
  affines, _, _ = geometry_lib.view_affines(*mask.shape, image_size=64, max_tiles=0)
  drawn = R.rasterize(prompt, affines[0], 64)
  geometry = R.prompt_geometry(prompt, affines[0], 64)
  rows, cols = np.nonzero(drawn)
  assert drawn.sum() >= 1
  assert geometry[0] * 64 <= cols.min() + 0.5 and cols.max() + 0.5 <= geometry[2] * 64
  assert geometry[1] * 64 <= rows.min() + 0.5 and rows.max() + 0.5 <= geometry[3] * 64
  # The same mask warped by views.py's nearest sampler agrees pixel for pixel.
  warped = views.warp_to_view(mask > 0, affines[0], 64, order=0)
  np.testing.assert_array_equal(drawn, warped.astype(np.float32))


def test_sub_pixel_prompts_stay_visible():
  coarse = _affine(0.05, 0)  # 20 original pixels per view pixel
  for prompt in [R.Prompt("box", (101, 47, 104, 49)),
                 R.Prompt("polygon", [(101, 47), (104, 47), (102, 49)]),
                 R.Prompt("scribble", [(100, 60)], width=2)]:
    got = R.rasterize(prompt, coarse, 16)
    bounds = prompt.bounds() * 0.05
    assert got.sum() == 1, prompt
    row, col = np.argwhere(got)[0]
    assert bounds[0] - 1 <= col <= bounds[2] and bounds[1] - 1 <= row <= bounds[3]


def test_prompt_outside_a_tile_draws_nothing():
  tile = _affine(2, -64)  # shows original [32, 64) at 2x
  for prompt in [R.Prompt("point", (5, 5)), R.Prompt("box", (0, 0, 10, 10)),
                 R.Prompt("scribble", [(1, 1), (9, 9)], width=3)]:
    assert R.rasterize(prompt, tile, 64).sum() == 0


def test_prompt_geometry():
  affine = _affine(0.5, 0)
  np.testing.assert_allclose(R.prompt_geometry(R.Prompt("box", (10, 20, 30, 60)), affine, 50),
                             [0.1, 0.2, 0.3, 0.6])
  np.testing.assert_allclose(R.prompt_geometry(R.Prompt("point", (10, 20)), affine, 50),
                             [0.1, 0.2, 0.1, 0.2])
  np.testing.assert_allclose(
      R.prompt_geometry(R.Prompt("scribble", [(10, 20), (30, 40)], width=4), affine, 50),
      [0.08, 0.18, 0.32, 0.42])
  # Clipped to the view.
  np.testing.assert_allclose(R.prompt_geometry(R.Prompt("box", (10, 20, 300, 60)), affine, 50),
                             [0.1, 0.2, 1.0, 0.6])


def test_prompt_fields_for_the_batch():
  height, width = 100, 200
  affines, _, _ = geometry_lib.view_affines(height, width, image_size=64, max_tiles=0)
  prompts = [{"kind": "point", "coords": (50, 50)},
             {"kind": "box", "coords": (-20, 10, 80, 90)},
             {"kind": "scribble", "coords": [(10, 10), (60, 80)], "width": 5}]
  fields = R.prompt_fields(prompts, (height, width), affines[0], view_size=64, map_size=32,
                           max_prompts=4)
  assert fields["prompt_maps"].shape == (4, 32, 32)
  assert fields["prompt_maps"].dtype == np.float32
  np.testing.assert_array_equal(fields["prompt_type"], [0, 1, 2, 0])
  np.testing.assert_array_equal(fields["prompt_valid"], [True, True, True, False])
  assert not fields["prompt_maps"][3].any() and not fields["prompt_geometry"][3].any()
  # The box was clipped at x=0 before drawing: its geometry starts at the image edge.
  # Global view scale 64 / 200 = 0.32 on both axes; geometry is normalised by the view side.
  np.testing.assert_allclose(fields["prompt_geometry"][1], [0, 0.05, 0.4, 0.45], atol=1e-6)
  # The map is the global view drawn at map_size: (50, 50) -> (16, 16) in the view -> (8, 8).
  assert fields["prompt_maps"][0].sum() == 1 and fields["prompt_maps"][0][8, 8] == 1


def test_box_partly_outside_is_clipped():
  (box,) = R.prepare_prompts([R.Prompt("box", (-10, 50, 70, 130))], (100, 60), 1)
  np.testing.assert_array_equal(box.coords, [0, 50, 60, 100])
  assert box.name == "<vp1>"


@pytest.mark.parametrize("prompt,message", [
    (dict(kind="box", coords=(10, 5, 4, 8)), "x1 <= x2"),
    (dict(kind="box", coords=(1, float("nan"), 4, 8)), "finite"),
    (dict(kind="point", coords=(float("inf"), 3)), "finite"),
    (dict(kind="polygon", coords=[(0, 0), (1, float("nan")), (2, 0)]), "finite"),
    (dict(kind="scribble", coords=[], width=3), "empty scribble"),
    (dict(kind="scribble", coords=[(1, 1), (5, 5)], width=0), "width"),
    (dict(kind="polygon", coords=[(0, 0), (5, 5)]), "at least 3"),
    (dict(kind="polygon", coords=[(0, 0), (5, 5), (10, 10)]), "zero area"),
    (dict(kind="mask", mask=np.zeros((4, 4))), "empty"),
    (dict(kind="mask", mask=np.full((4, 4), 7)), "binary"),
    (dict(kind="box", coords=(1, 2, 3)), r"shape \(4,\)"),
    (dict(kind="circle", coords=(1, 2, 3)), "kind must be one of"),
    (dict(kind="box", coords=("a", 2, 3, 4)), "numbers"),
    (dict(kind="box", coords=(1, 2, 3, 4), colour="red"), "unknown fields"),
])
def test_bad_prompt_raises_naming_the_prompt(prompt, message):
  with pytest.raises(ValueError, match=message) as info:
    R.prepare_prompts([dict(kind="point", coords=(1, 1)), prompt], (20, 20), 4)
  assert "<vp2>" in str(info.value)


@pytest.mark.parametrize("prompt", [
    dict(kind="box", coords=(30, 0, 40, 10)),
    dict(kind="box", coords=(-10, -10, 0, 5)),
    dict(kind="point", coords=(20, 3)),
    dict(kind="polygon", coords=[(-5, -5), (-1, -5), (-1, -1)]),
    dict(kind="scribble", coords=[(25, 1), (28, 9)], width=2),
])
def test_prompt_entirely_outside_the_image_raises(prompt):
  with pytest.raises(ValueError, match=r"<vp1>.*outside the image"):
    R.prepare_prompts([prompt], (20, 20), 4)


def test_mask_of_another_size_and_too_many_prompts_raise():
  with pytest.raises(ValueError, match=r"<vp1>.*mask shape \(4, 4\) differs"):
    R.prepare_prompts([dict(kind="mask", mask=np.ones((4, 4)))], (20, 20), 4)
  with pytest.raises(ValueError, match=r"got 3, more than max_prompts=2; prompt <vp3>"):
    R.prepare_prompts([dict(kind="point", coords=(1, 1))] * 3, (20, 20), 2)


def test_bad_view_raises():
  prompt = R.Prompt("point", (1, 1))
  with pytest.raises(ValueError, match="affine"):
    R.rasterize(prompt, np.eye(2), 8)
  with pytest.raises(ValueError, match="singular"):
    R.rasterize(prompt, np.zeros((2, 3)), 8)
  with pytest.raises(ValueError, match="size"):
    R.rasterize(prompt, _affine(1, 0), 0)
