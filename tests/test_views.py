"""Zoom views: geometry of every view, coordinate / mask round trips, tile choice, static shapes."""

import numpy as np
import pytest

from configs import fusion
from data_pipelines import views as views_lib
from earthgptx_jax import geometry


def _box_image(height, width, box):
  """A black float image with a white axis-aligned rectangle on integer pixel edges."""
  image = np.zeros([height, width, 3], np.float32)
  x1, y1, x2, y2 = box
  image[y1:y2, x1:x2] = 1.0
  return image


def _bbox(mask):
  """Edge-convention bounding box (x1, y1, x2, y2) of a boolean mask."""
  ys, xs = np.nonzero(mask)
  return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


@pytest.mark.parametrize("height,width,max_tiles", [(300, 500, 4), (1200, 700, 4),
                                                    (97, 61, 2), (64, 2000, 3)])
def test_box_lands_on_same_pixels_in_every_view(height, width, max_tiles):
  size = 64
  box = (width // 5, height // 4,
         width // 5 + max(width // 3, 12), height // 4 + max(height // 3, 12))
  image = _box_image(height, width, box)
  views = views_lib.make_views(image, size, max_tiles)
  assert views.pixels.shape == (1 + max_tiles, size, size, 3)
  assert views.pixels.dtype == np.float32 and views.affine.dtype == np.float32
  assert views.pixels.min() >= 0.0 and views.pixels.max() <= 1.0
  for v in np.nonzero(views.valid)[0]:
    expected = geometry.boxes_to_view(np.array(box), views.affine[v])
    expected = np.clip(expected, 0, size)
    if expected[2] - expected[0] < 2 or expected[3] - expected[1] < 2:
      continue  # box outside this tile
    seen = _bbox(views.pixels[v, ..., 0] > 0.5)
    np.testing.assert_allclose(seen, expected, atol=1.0)
    # ... and back to the original frame within a pixel (the part of the box inside the tile).
    inside = geometry.boxes_to_original(seen, views.affine[v])
    tile = geometry.boxes_to_original(np.array([0, 0, size, size]), views.affine[v])
    clipped = np.concatenate([np.maximum(box[:2], tile[:2]), np.minimum(box[2:], tile[2:])])
    scale = np.abs(np.diag(views.affine[v][:, :2]))  # view px per original px
    np.testing.assert_array_less(np.abs(inside - clipped) * np.tile(scale, 2), 1.0 + 1e-6)


def test_global_view_is_sam_resize_and_pad():
  image = np.random.default_rng(0).uniform(size=[300, 500, 3]).astype(np.float32)
  views = views_lib.make_views(image, 100, 2)
  new_h, new_w = geometry.global_view_shape(300, 500, 100)
  assert (new_h, new_w) == (60, 100)
  assert np.all(views.pixels[0, new_h:] == 0)
  np.testing.assert_allclose(views.affine[0], [[0.2, 0, 0], [0, 0.2, 0]], rtol=1e-6)
  # The global view's average colour is the image's (resampling keeps the mean).
  np.testing.assert_allclose(views.pixels[0, :new_h].mean((0, 1)), image.mean((0, 1)), atol=5e-3)


def test_tiles_cover_the_image_exactly():
  height, width = 400, 800
  _, valid, boxes = geometry.view_affines(height, width, 32, 4)
  assert valid.tolist() == [True, True, True, False, False]  # 1x2 grid for a 2:1 image
  assert boxes[1:] == [(0.0, 0.0, 400.0, 400.0), (400.0, 0.0, 800.0, 400.0)]


def test_padding_tiles_are_empty_and_carry_the_global_affine():
  views = views_lib.make_views(np.ones([50, 100, 3], np.float32), 16, 4)
  assert views.valid.tolist() == [True, True, True, False, False]
  assert np.all(views.pixels[3:] == 0)
  np.testing.assert_array_equal(views.affine[3], views.affine[0])
  geometry.invert_affine(views.affine)  # batched, never singular


@pytest.mark.parametrize("height,width,max_tiles,grid", [
    (100, 4000, 4, (1, 4)), (4000, 100, 4, (4, 1)), (1000, 1000, 4, (2, 2)),
    (1000, 1000, 2, (1, 2)), (1000, 2000, 4, (1, 2)), (3000, 1000, 4, (3, 1)),
    (1000, 1000, 1, (1, 1)), (1000, 1000, 0, (0, 0)), (500, 400, 6, (3, 2)), (520, 500, 6, (2, 2)),
    (600, 1000, 6, (2, 3))])
def test_tile_grid_for_aspect_ratio(height, width, max_tiles, grid):
  assert geometry.select_grid(height, width, max_tiles) == grid


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_view_count_is_static_per_config(preset):
  vision = fusion.get_config(preset).model.vision
  shapes = set()
  for hw in [(16, 16), (100, 3000), (3000, 100), (777, 555)]:
    affines, valid, _ = geometry.view_affines(*hw, vision.image_size, vision.max_tiles)
    shapes.add((affines.shape, valid.shape))
  assert shapes == {((1 + vision.max_tiles, 2, 3), (1 + vision.max_tiles,))}


def test_points_round_trip_through_every_affine():
  affines, _, _ = geometry.view_affines(333, 901, 64, 4)
  points = np.random.default_rng(1).uniform([0, 0], [901, 333], size=[20, 2])
  for affine in affines:
    back = geometry.apply_affine(geometry.apply_affine(points, affine),
                                 geometry.invert_affine(affine))
    np.testing.assert_allclose(back, points, atol=1e-3)


def test_mask_round_trip_through_global_and_tile_views():
  height, width, size = 210, 330, 64
  mask = np.zeros([height, width], np.float32)
  mask[50:140, 90:250] = 1.0
  affines, valid, _ = geometry.view_affines(height, width, size, 2)
  for affine in affines[valid]:
    in_view = views_lib.warp_to_view(mask, affine, size, order=0)
    expected = np.clip(geometry.boxes_to_view(np.array([90, 50, 250, 140]), affine), 0, size)
    if np.any(in_view > 0):
      np.testing.assert_allclose(_bbox(in_view > 0.5), expected, atol=1.0)
  # Global view -> original (SAM post-processing): the box comes back within a pixel of
  # original resolution scaled by the zoom factor.
  in_view = views_lib.warp_to_view(mask, affines[0], size, order=1)
  back = views_lib.warp_to_original(in_view, affines[0], (height, width), order=1) > 0.5
  np.testing.assert_allclose(_bbox(back), [90, 50, 250, 140], atol=1.0 / affines[0][0, 0])


def test_bad_input_names_the_field():
  with pytest.raises(ValueError, match="image size"):
    geometry.select_grid(0, 10, 4)
  with pytest.raises(ValueError, match=r"image: expected shape \[H, W, 3\]"):
    views_lib.make_views(np.zeros([10, 10]), 16, 2)
  with pytest.raises(ValueError, match="dtype uint8"):
    views_lib.make_views(np.zeros([10, 10, 3], np.uint8), 16, 2)
  with pytest.raises(ValueError, match="max_tiles"):
    geometry.select_grid(10, 10, -1)
  with pytest.raises(ValueError, match="singular"):
    geometry.invert_affine(np.zeros([2, 3]))
