"""Spatial-aware prompt encoder and multi-modal content integration (tiny config, CPU).

Prompts are drawn by the real rasteriser, so these tests also pin the data path
(record prompts -> batch fields -> prompt tokens -> LLM-width tokens).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from transformers.models.sam import modeling_sam

from configs import fusion as fusion_config
from data_pipelines import rasterize
from earthgptx_jax import geometry, sharding
from earthgptx_jax.models import earthgptx, prompts
from earthgptx_jax.models import integration as integration_lib

LLM_WIDTH = 24
IMAGE_WIDTH = 20  # C_img: the encoder takes it from its input
TOKENS_PER_VIEW = 4


@pytest.fixture(scope="module")
def cfg():
  return fusion_config.get_config("tiny").model.prompt


@pytest.fixture(scope="module")
def batch(cfg):
  """Two examples: (point, box) and (scribble, padding), drawn on the global view."""
  height, width, view_size = 100, 200, 64
  affines, _, _ = geometry.view_affines(height, width, view_size, max_tiles=2)
  examples = [[{"kind": "point", "coords": (50, 40)},
               {"kind": "box", "coords": (120, 10, 190, 70)}],
              [{"kind": "scribble", "coords": [(10, 10), (60, 80), (150, 30)], "width": 6}]]
  fields = [rasterize.prompt_fields(e, (height, width), affines[0], view_size, cfg.map_size,
                                    cfg.max_prompts) for e in examples]
  out = {k: jnp.asarray(np.stack([f[k] for f in fields])) for k in fields[0]}
  rng = np.random.default_rng(0)
  out["image_tokens"] = jnp.asarray(rng.normal(size=(2, 3 * TOKENS_PER_VIEW, IMAGE_WIDTH)),
                                    jnp.float32)
  view_valid = np.array([[True, True, True], [True, True, False]])
  out["image_valid"] = jnp.asarray(np.repeat(view_valid, TOKENS_PER_VIEW, axis=1))
  grid = int(np.sqrt(TOKENS_PER_VIEW))
  out["image_cells"] = earthgptx.image_token_cells(
      jnp.asarray(np.stack([affines, affines])), view_size, grid)
  return out


@pytest.fixture(scope="module")
def models(cfg, batch):
  encoder = prompts.VisualPromptEncoder(cfg)
  integration = integration_lib.ContentIntegration(cfg, LLM_WIDTH)
  k1, k2 = jax.random.split(jax.random.key(0))
  prompt_inputs = (batch["prompt_maps"], batch["prompt_geometry"], batch["prompt_type"],
                   batch["prompt_valid"])
  enc_vars = jax.jit(encoder.init)(k1, *prompt_inputs)
  encode = jax.jit(encoder.apply)
  int_vars = jax.jit(integration.init)(k2, batch["image_tokens"], batch["image_cells"],
                                       batch["image_valid"], encode(enc_vars, *prompt_inputs),
                                       batch["prompt_geometry"], batch["prompt_valid"])
  integrate = jax.jit(integration.apply)
  return dict(encoder=encoder, integration=integration, enc_vars=enc_vars, int_vars=int_vars,
              encode=encode, integrate=integrate)


def test_image_token_cells_map_every_view_cell_into_the_global_view():
  """Token (i, j) of view v covers its cell, mapped to the original by view v's inverse affine
  and into the global view by view 0's, over the view side (the prompt frame)."""
  height, width, size, grid = 90, 150, 64, 4
  affines, valid, _ = geometry.view_affines(height, width, size, max_tiles=2)
  assert valid.all()
  got = np.asarray(earthgptx.image_token_cells(jnp.asarray(affines[None]), size, grid))[0]
  edges = np.arange(grid + 1) * size / grid
  for v in range(3):
    for corner, (ex, ey) in ((slice(0, 2), (edges[:-1], edges[:-1])),
                             (slice(2, 4), (edges[1:], edges[1:]))):
      xy = np.stack(np.meshgrid(ex, ey, indexing="xy"), -1).reshape(-1, 2)
      original = geometry.apply_affine(xy, geometry.invert_affine(affines[v]))
      want = geometry.apply_affine(original, affines[0]) / size
      np.testing.assert_allclose(got[v * grid**2:(v + 1) * grid**2, corner], want, atol=1e-5)
  np.testing.assert_allclose(got[:grid], [[j / grid, 0, (j + 1) / grid, 1 / grid]
                                          for j in range(grid)], atol=1e-6)
  # Two zoom tiles split the image: each tile cell is half a global cell wide.
  tile_width = got[grid**2:, 2] - got[grid**2:, 0]
  np.testing.assert_allclose(tile_width, (got[0, 2] - got[0, 0]) / 2, rtol=1e-5)


def test_cells_under_boxes():
  cells = earthgptx.image_token_cells(jnp.asarray(np.eye(2, 3, dtype=np.float32)[None, None]),
                                      64, 4)  # the identity view: 4 x 4 cells of 1/4
  boxes = jnp.asarray([[[0.1, 0.1, 0.1, 0.1],  # a point inside cell (0, 0)
                        [0.3, 0.6, 0.55, 0.7],  # a box over cells x 1..2, y 2
                        [0.5, 0.5, 0.5, 0.5]]])  # a point on the corner of four cells
  under = np.asarray(integration_lib.cells_under_boxes(cells, boxes))[0]
  under = under.reshape(3, 4, 4)  # [P, y, x]
  expected = np.zeros((3, 4, 4), bool)
  expected[0, 0, 0] = True
  expected[1, 2, 1:3] = True
  expected[2, 1:3, 1:3] = True
  np.testing.assert_array_equal(under, expected)


def test_prompt_tokens_read_only_the_image_under_their_prompt(models, batch):
  """With both self-attentions silenced (their weights zeroed: they mix all image tokens), a
  prompt token sees the image only through the masked cross-attention: changing image tokens
  away from a prompt leaves its tokens alone; changing one under it moves them."""
  mixing = ("image_self_attn", "joint_self_attn")
  variables = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 0 if any(m in jax.tree_util.keystr(path) for m in mixing) else x,
      models["int_vars"])
  silenced = dict(models, int_vars=variables)
  embeds = _encode(models, batch)
  under = np.asarray(integration_lib.cells_under_boxes(batch["image_cells"],
                                                       batch["prompt_geometry"]))
  point_cells = under[0, 0]  # example 0, prompt 0 (the point)
  assert 0 < point_cells.sum() < point_cells.size
  _, prompt_llm = _integrate(silenced, batch, embeds)
  away = dict(batch, image_tokens=batch["image_tokens"].at[0, ~point_cells].multiply(3.0))
  _, prompt_away = _integrate(silenced, away, embeds)
  np.testing.assert_allclose(prompt_away[0, 0], prompt_llm[0, 0], atol=1e-6)
  assert _relative_change(prompt_away[0, 1], prompt_llm[0, 1]) > 1e-3  # the box's cells moved
  near = dict(batch, image_tokens=batch["image_tokens"].at[0, point_cells].multiply(3.0))
  assert _relative_change(_integrate(silenced, near, embeds)[1][0, 0], prompt_llm[0, 0]) > 1e-3


def _encode(models, b):
  return models["encode"](models["enc_vars"], b["prompt_maps"], b["prompt_geometry"],
                          b["prompt_type"], b["prompt_valid"])


def _integrate(models, b, embeds):
  return models["integrate"](models["int_vars"], b["image_tokens"], b["image_cells"],
                             b["image_valid"], embeds, b["prompt_geometry"], b["prompt_valid"])


def _permute_prompts(b, order):
  out = dict(b)
  for key in ("prompt_maps", "prompt_geometry", "prompt_type", "prompt_valid"):
    out[key] = b[key][:, order]
  return out


def test_shapes_and_padding_outputs(cfg, models, batch):
  embeds = _encode(models, batch)
  k, d = cfg.tokens_per_prompt, cfg.embed_dim
  assert embeds.shape == (2, cfg.max_prompts, k, d) and embeds.dtype == jnp.float32
  image_llm, prompt_llm = _integrate(models, batch, embeds)
  assert image_llm.shape == (2, 3 * TOKENS_PER_VIEW, LLM_WIDTH)
  assert prompt_llm.shape == (2, cfg.max_prompts, k, LLM_WIDTH)
  assert np.all(np.isfinite(image_llm)) and np.all(np.isfinite(prompt_llm))
  # Absent prompt (example 1, slot 1) and padding view (example 1, last view) are zeros.
  assert not np.any(embeds[1, 1]) and not np.any(prompt_llm[1, 1])
  assert not np.any(image_llm[1, -TOKENS_PER_VIEW:])
  assert np.all(np.abs(prompt_llm[0]).sum(-1) > 0) and np.all(np.abs(image_llm[0]).sum(-1) > 0)


def test_permuting_prompts_permutes_their_tokens(models, batch):
  order = np.array([1, 0])
  permuted = _permute_prompts(batch, order)
  embeds, embeds_p = _encode(models, batch), _encode(models, permuted)
  np.testing.assert_allclose(embeds_p, embeds[:, order], atol=1e-6)
  image_llm, prompt_llm = _integrate(models, batch, embeds)
  image_llm_p, prompt_llm_p = _integrate(models, permuted, embeds_p)
  np.testing.assert_allclose(prompt_llm_p, prompt_llm[:, order], atol=1e-5)
  np.testing.assert_allclose(image_llm_p, image_llm, atol=1e-5)


def test_absent_prompts_do_not_change_present_ones(cfg, models, batch):
  """Garbage (random maps, NaN geometry, out-of-range type) in an absent slot changes nothing."""
  garbage = dict(batch)
  rng = np.random.default_rng(1)
  garbage["prompt_maps"] = batch["prompt_maps"].at[1, 1].set(
      rng.random((cfg.map_size, cfg.map_size)) > 0.5)
  garbage["prompt_geometry"] = batch["prompt_geometry"].at[1, 1].set(jnp.nan)
  garbage["prompt_type"] = batch["prompt_type"].at[1, 1].set(7)
  embeds, embeds_g = _encode(models, batch), _encode(models, garbage)
  np.testing.assert_array_equal(embeds_g, embeds)
  # The integration block masks absent prompts whatever their embeddings hold.
  noisy = embeds_g.at[1, 1].set(jnp.nan)
  outputs, outputs_g = _integrate(models, batch, embeds), _integrate(models, garbage, noisy)
  for a, b in zip(outputs, outputs_g):
    np.testing.assert_allclose(b, a, atol=1e-6)


def test_padding_views_and_examples_without_prompts(cfg, models, batch):
  embeds = _encode(models, batch)
  padded = dict(batch)
  padded["image_tokens"] = batch["image_tokens"].at[1, -TOKENS_PER_VIEW:].set(jnp.nan)
  for a, b in zip(_integrate(models, batch, embeds), _integrate(models, padded, embeds)):
    np.testing.assert_allclose(b, a, atol=1e-6)
  # No prompt at all: the image tokens do not depend on what the absent slots hold.
  empty = dict(batch, prompt_valid=jnp.zeros_like(batch["prompt_valid"]))
  image_a, prompt_a = _integrate(models, empty, _encode(models, empty))
  image_b, prompt_b = _integrate(models, empty, embeds)
  assert not np.any(prompt_a) and not np.any(prompt_b)
  np.testing.assert_allclose(image_b, image_a, atol=1e-6)
  assert np.all(np.isfinite(image_a))


def test_tokens_depend_on_the_prompt_and_the_image(cfg, models, batch):
  embeds = _encode(models, batch)
  moved = dict(batch)
  moved["prompt_maps"] = batch["prompt_maps"].at[0, 1].set(jnp.roll(batch["prompt_maps"][0, 1],
                                                                    -8, axis=1))
  moved["prompt_geometry"] = batch["prompt_geometry"].at[0, 1].add(jnp.array([-.25, 0, -.25, 0]))
  embeds_m = _encode(models, moved)
  assert _relative_change(embeds_m[0, 1], embeds[0, 1]) > 1e-2  # the box moved
  np.testing.assert_allclose(embeds_m[0, 0], embeds[0, 0], atol=1e-6)  # the point did not
  retyped = dict(batch, prompt_type=batch["prompt_type"].at[0, 1].set(rasterize.FREE_FORM))
  assert _relative_change(_encode(models, retyped)[0, 1], embeds[0, 1]) > 1e-2
  # Cross-attention: prompt tokens read the image; joint attention: image tokens see prompts.
  image_llm, prompt_llm = _integrate(models, batch, embeds)
  other = dict(batch, image_tokens=batch["image_tokens"] * 2.0)
  assert _relative_change(_integrate(models, other, embeds)[1], prompt_llm) > 1e-3
  assert _relative_change(_integrate(models, moved, embeds_m)[0][0], image_llm[0]) > 1e-4


def _relative_change(a, b) -> float:
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_gradients_reach_every_parameter(cfg, models, batch):
  encoder, integration = models["encoder"], models["integration"]
  rng = np.random.default_rng(2)
  w_image = jnp.asarray(rng.normal(size=(2, 3 * TOKENS_PER_VIEW, LLM_WIDTH)), jnp.float32)
  w_prompt = jnp.asarray(rng.normal(size=(2, cfg.max_prompts, cfg.tokens_per_prompt,
                                          LLM_WIDTH)), jnp.float32)

  def loss(enc_vars, int_vars):
    embeds = encoder.apply(enc_vars, batch["prompt_maps"], batch["prompt_geometry"],
                           batch["prompt_type"], batch["prompt_valid"])
    image_llm, prompt_llm = integration.apply(int_vars, batch["image_tokens"],
                                              batch["image_cells"], batch["image_valid"],
                                              embeds, batch["prompt_geometry"],
                                              batch["prompt_valid"])
    return jnp.sum(image_llm * w_image) + jnp.sum(prompt_llm * w_prompt)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(models["enc_vars"], models["int_vars"])
  flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(grads))[0]
  assert len(flat) > 20
  dead = [jax.tree_util.keystr(path) for path, g in flat
          if not (np.all(np.isfinite(g)) and np.abs(g).max() > 0)]
  assert not dead, f"no gradient reaches: {dead}"


def test_every_parameter_is_partitioned_and_runs_sharded(cfg, models, batch):
  """8 host devices, mesh (data=2, fsdp=2, tensor=2): sharded outputs equal unsharded ones."""
  variables = {"enc": models["enc_vars"], "int": models["int_vars"]}
  leaves = jax.tree_util.tree_leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
  mesh = sharding.make_mesh((2, 2, 2))
  shardings = sharding.logical_to_shardings(nn.get_partition_spec(variables), mesh)
  params = jax.device_put(nn.meta.unbox(variables), shardings)

  def forward(v, b):
    with nn.logical_axis_rules(sharding.logical_axis_rules()):
      embeds = models["encoder"].apply(v["enc"], b["prompt_maps"], b["prompt_geometry"],
                                       b["prompt_type"], b["prompt_valid"])
      return models["integration"].apply(v["int"], b["image_tokens"], b["image_cells"],
                                         b["image_valid"], embeds, b["prompt_geometry"],
                                         b["prompt_valid"])

  big = {k: jnp.concatenate([v, v]) for k, v in batch.items()}  # B=4 over data x fsdp
  sharded_batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim))
                   for k, v in big.items()}
  with jax.set_mesh(mesh):
    got = jax.jit(forward)(params, sharded_batch)
  want = _integrate(models, batch, _encode(models, batch))
  for a, b in zip(want, got):
    np.testing.assert_allclose(np.asarray(b)[:2], np.asarray(a), atol=1e-5)
    np.testing.assert_allclose(np.asarray(b)[2:], np.asarray(a), atol=1e-5)


def test_fourier_features_match_sam(cfg):
  gaussian = np.asarray(prompts.fourier_gaussian(cfg))
  reference = modeling_sam.SamPositionalEmbedding(
      types.SimpleNamespace(num_pos_feats=cfg.fourier_features, scale=cfg.fourier_scale))
  with torch.no_grad():
    reference.positional_embedding.copy_(torch.tensor(gaussian))
  coords = np.random.default_rng(3).random((1, 2, 5, 2)).astype(np.float32)
  with torch.no_grad():
    want = reference(torch.from_numpy(coords)).numpy()
  got = prompts.fourier_features(jnp.asarray(coords), jnp.asarray(gaussian))
  assert got.shape == (1, 2, 5, 2 * cfg.fourier_features)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Fixed by the config: same seed, same frequencies; another seed, others.
  np.testing.assert_array_equal(prompts.fourier_gaussian(cfg), gaussian)
  other = cfg.copy_and_resolve_references()
  other.fourier_seed = 1
  assert np.abs(np.asarray(prompts.fourier_gaussian(other)) - gaussian).max() > 0.1


def test_bad_shapes_raise_naming_the_field(cfg, models, batch):
  with pytest.raises(ValueError, match="prompt_maps.*map_size"):
    _encode(models, dict(batch, prompt_maps=batch["prompt_maps"][..., :16, :16]))
  with pytest.raises(ValueError, match="prompt_geometry"):
    _encode(models, dict(batch, prompt_geometry=batch["prompt_geometry"][..., :2]))
  too_many = {k: jnp.concatenate([batch[k]] * 2, axis=1)
              for k in ("prompt_maps", "prompt_geometry", "prompt_type", "prompt_valid")}
  with pytest.raises(ValueError, match="max_prompts"):
    _encode(models, too_many)
  with pytest.raises(ValueError, match="embed_dim"):
    _integrate(models, batch, jnp.zeros((2, cfg.max_prompts, cfg.tokens_per_prompt, 7)))
