"""Region features (models/regions.py): RoIAlign against torch `grid_sample`, its geometry, and
what the region vector depends on (tiny config, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import linen as nn

from configs import fusion as fusion_config
from earthgptx_jax import torch_modules
from earthgptx_jax.models import regions


@pytest.fixture(scope="module")
def cfg():
  return fusion_config.get_config("tiny").model


def _boxes():
  """Boxes inside, over the edges, a point (zero size), a thin box, a point in a corner."""
  return np.array([[[0.2, 0.3, 0.6, 0.5], [-0.1, 0.7, 0.3, 1.2], [0.41, 0.52, 0.41, 0.52]],
                   [[0.1, 0.1, 0.9, 0.12], [0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 1.0, 1.0]]],
                  np.float32)


@pytest.mark.parametrize("bins,min_size", [(8, 0.1), (4, 0.0), (1, 0.3)])
def test_roi_align_equals_torch_grid_sample(bins, min_size):
  features = np.random.default_rng(0).normal(size=(2, 13, 17, 5)).astype(np.float32)
  ours = regions.roi_align(jnp.asarray(features), jnp.asarray(_boxes()), bins, min_size)
  points = np.asarray(regions.sample_points(jnp.asarray(_boxes()), bins, min_size))
  grid = torch.from_numpy(points.reshape(2, -1, bins, 2) * 2 - 1)
  ref = F.grid_sample(torch.from_numpy(features).permute(0, 3, 1, 2), grid, mode="bilinear",
                      padding_mode="border", align_corners=False)  # [B, C, P*bins, bins]
  ref = ref.permute(0, 2, 3, 1).reshape(2, 3, bins, bins, 5).numpy()
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-6)


def test_sample_points_cover_the_box_and_widen_points():
  boxes = jnp.asarray([[[0.2, 0.4, 0.6, 0.5], [0.3, 0.7, 0.3, 0.7]]])
  pts = np.asarray(regions.sample_points(boxes, 4, 0.2))  # [1, 2, 4, 4, 2]
  # The box: bin centres at x1 + (i + 0.5) / 4 * (x2 - x1); its 0.1-high side is widened to 0.2.
  np.testing.assert_allclose(pts[0, 0, 0, :, 0], 0.2 + (np.arange(4) + 0.5) / 4 * 0.4, atol=1e-6)
  np.testing.assert_allclose(pts[0, 0, :, 0, 1], 0.35 + (np.arange(4) + 0.5) / 4 * 0.2, atol=1e-6)
  # The point: a 0.2 x 0.2 square centred on it.
  np.testing.assert_allclose(pts[0, 1].mean((0, 1)), [0.3, 0.7], atol=1e-6)
  np.testing.assert_allclose(pts[0, 1, 0, 0], [0.3 - 0.075, 0.7 - 0.075], atol=1e-6)


def test_bilinear_sample_is_exact_on_a_linear_map():
  """A map whose value is its pixel centre's x + 2y: inside the centres, samples return the
  sampled point's own coordinates exactly (bilinear reproduces linear functions)."""
  h, w = 8, 16
  ys, xs = np.mgrid[0:h, 0:w]
  fmap = ((xs + 0.5) / w + 2 * (ys + 0.5) / h).astype(np.float32)[None, ..., None]
  pts = np.random.default_rng(1).uniform([0.5 / w, 0.5 / h], [1 - 0.5 / w, 1 - 0.5 / h],
                                         size=(1, 50, 2)).astype(np.float32)
  got = np.asarray(regions.bilinear_sample(jnp.asarray(fmap), jnp.asarray(pts)))[0, :, 0]
  np.testing.assert_allclose(got, pts[0, :, 0] + 2 * pts[0, :, 1], atol=1e-5)


@pytest.fixture(scope="module", params=[False, True], ids=["samples", "samples+box"])
def encoder(request, cfg):
  cfg = cfg.copy_and_resolve_references()
  cfg.prompt.region.box_features = request.param
  module = regions.RegionEncoder(cfg.prompt, cfg.llm.hidden_size)
  maps = [jax.random.uniform(jax.random.key(1), (2, 64, 64, 3)),
          jax.random.normal(jax.random.key(2), (2, 16, 16, 8))]
  geometry = jnp.asarray([[[0.1, 0.1, 0.3, 0.3], [0.7, 0.6, 0.7, 0.6]],
                          [[0.4, 0.4, 0.6, 0.9], [0.0, 0.0, 0.0, 0.0]]])
  valid = jnp.asarray([[True, True], [True, False]])
  params = module.init(jax.random.key(0), maps, geometry, valid)
  return module, params, maps, geometry, valid


def test_region_vector_reads_only_the_box(encoder):
  module, params, maps, geometry, valid = encoder
  apply = jax.jit(module.apply)
  out = np.asarray(apply(params, maps, geometry, valid))
  assert out.shape == (2, 2, 64)
  assert not out[1, 1].any(), "an absent prompt gives zeros"
  # Pixels far from example 0's first box (top-left 0.1..0.3) change only the point prompt's
  # vector (at 0.7, 0.6), and never example 1.
  far = maps[0].at[0, 32:, 32:].set(0.0)
  moved = np.asarray(apply(params, [far, maps[1]], geometry, valid))
  np.testing.assert_array_equal(moved[0, 0], out[0, 0])
  assert np.abs(moved[0, 1] - out[0, 1]).max() > 1e-3
  np.testing.assert_array_equal(moved[1], out[1])


def test_box_features_tell_region_sizes_apart(encoder):
  """RoIAlign resamples every box to bins x bins: over a uniform map, two boxes of different
  sizes give the same samples, and only the box features tell them apart."""
  module, params, maps, _, valid = encoder
  flat = [jnp.full_like(m, 0.5) for m in maps]
  boxes = jnp.asarray([[[0.2, 0.2, 0.3, 0.3], [0.2, 0.2, 0.6, 0.6]]] * 2)
  out = np.asarray(module.apply(params, flat, boxes, jnp.ones_like(valid)))
  differ = np.abs(out[0, 0] - out[0, 1]).max() > 1e-4
  assert differ == module.config.region.box_features


def test_torch_region_encoder_matches(cfg, encoder):
  module, params, maps, geometry, valid = encoder
  ours = np.asarray(module.apply(params, maps, geometry, valid))
  cfg = cfg.copy_and_resolve_references()
  cfg.prompt = module.config
  theirs = torch_modules.RegionEncoder(cfg)
  p = jax.tree.map(np.asarray, nn.meta.unbox(params)["params"])
  state = {"norm.weight": p["norm"]["scale"], "norm.bias": p["norm"]["bias"]}
  for name in ("fc1", "fc2", "box_proj"):
    if name in p:
      state |= {f"{name}.weight": p[name]["kernel"].T, f"{name}.bias": p[name]["bias"]}
  theirs.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
  with torch.no_grad():
    ref = theirs([torch.from_numpy(np.asarray(m)).permute(0, 3, 1, 2) for m in maps],
                 torch.from_numpy(np.asarray(geometry)), torch.from_numpy(np.asarray(valid)))
  np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5)


@pytest.mark.parametrize("field,value,message", [
    ("sources", ("pixels", "convnext_4"), "model.prompt.region.sources: unknown map 'convnext_4'"),
    ("sources", ("rgb",), "model.prompt.region.sources: unknown map 'rgb'"),
    ("bins", 0, "model.prompt.region.bins: need >= 1, got 0"),
    ("min_size", 1.5, r"model.prompt.region.min_size: need a fraction in \[0, 1\], got 1.5"),
])
def test_bad_region_config_is_named(cfg, field, value, message):
  region = cfg.prompt.region.copy_and_resolve_references()
  region[field] = value
  with pytest.raises(ValueError, match=message):
    regions.check_sources(region, len(cfg.vision.convnext.dims))
