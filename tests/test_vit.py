"""DINOv2 ViT: exact position-embedding resampling, parity with HF Dinov2 (+ registers, SwiGLU),
folder round trips, reuse as a 1-channel prompt encoder, and the mixed encoder built on it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from configs import fusion
from earthgptx_jax.convert import keymap
from earthgptx_jax.convert import vision as convert
from earthgptx_jax.models import convnext as convnext_lib
from earthgptx_jax.models import vision as vision_lib
from earthgptx_jax.models import vit as vit_lib


def _rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _randomise(module: torch.nn.Module, seed: int) -> None:
  """Random weights everywhere (layer scales, norms, mask / register tokens included)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("lambda1") or p.ndim == 1 and "norm" in name:
        p.copy_(0.5 + torch.rand(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p[0].numel()) ** 0.5))


@pytest.fixture(scope="module")
def base():
  return fusion.get_config("tiny").model.vision.dino


@pytest.mark.parametrize("antialias", [False, True])
def test_resize_matrix_matches_torch_interpolate(antialias):
  rng = np.random.default_rng(0)
  for g, h, w in [(4, 6, 3), (37, 32, 32), (16, 23, 9), (5, 5, 7), (37, 74, 18)]:
    grid = rng.standard_normal([1, 3, g, g]).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(grid), size=(h, w), mode="bicubic",
                                          align_corners=False, antialias=antialias).numpy()
    ours = np.einsum("yi,xj,cij->cyx", vit_lib.resize_matrix(g, h, antialias),
                     vit_lib.resize_matrix(g, w, antialias), grid[0].astype(np.float64))
    assert _rel_err(ours, ref[0]) <= 1e-6, (g, h, w)


def _hf_folder(tmp_path_factory, registers: bool, swiglu: bool = False, seed: int = 0):
  import transformers
  kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8, use_swiglu_ffn=swiglu, layerscale_value=1.0)
  if registers:
    model = transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(num_register_tokens=3, **kwargs))
  else:
    model = transformers.Dinov2Model(transformers.Dinov2Config(**kwargs))
  _randomise(model, seed)
  folder = tmp_path_factory.mktemp("dinov2")
  model.save_pretrained(folder)
  return folder, model.eval()


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
  return _hf_folder(tmp_path_factory, registers=False)


@pytest.fixture(scope="module")
def dinov2_registers(tmp_path_factory):
  return _hf_folder(tmp_path_factory, registers=True, seed=1)


@pytest.fixture(scope="module")
def dinov2_loaded(dinov2, base):
  return convert.load_dinov2(dinov2[0], base)


def _apply(cfg, params, x_nchw, **kwargs):
  """Jitted forward on a torch NCHW batch."""
  x = jnp.asarray(x_nchw.permute(0, 2, 3, 1).numpy())
  return jax.jit(functools.partial(vit_lib.ViT(cfg).apply, **kwargs))({"params": params}, x)


# Native 32x32 (4x4 grid), larger and non-square (grid 6x5: resampled up), smaller (2x3: down).
@pytest.mark.parametrize("hw", [(32, 32), (48, 40), (16, 24)])
def test_parity_with_hf_dinov2(dinov2, dinov2_loaded, hw):
  _, model = dinov2
  cfg, params = dinov2_loaded
  assert not cfg.pos_interp_antialias and cfg.num_register_tokens == 0
  x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    ref = model(x, output_hidden_states=True)
  out = _apply(cfg, params, x)
  assert out.grid == (hw[0] // 8, hw[1] // 8)
  assert _rel_err(out.last_hidden_state, ref.last_hidden_state.numpy()) <= 1e-5
  assert _rel_err(out.cls, ref.pooler_output.numpy()) <= 1e-5
  penultimate = _apply(cfg, params, x, feature_layer=-2)
  assert _rel_err(penultimate.patch_tokens, ref.hidden_states[-2][:, 1:].numpy()) <= 1e-5


def test_parity_with_masked_patches(dinov2, dinov2_loaded):
  _, model = dinov2
  cfg, params = dinov2_loaded
  x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
  mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(4)) < 0.5
  with torch.no_grad():
    ref = model(x, bool_masked_pos=mask).last_hidden_state.numpy()
  out = _apply(cfg, params, x, bool_masked_pos=jnp.asarray(mask.numpy()))
  assert _rel_err(out.last_hidden_state, ref) <= 1e-5


@pytest.mark.parametrize("hw", [(48, 40), (16, 24)])
def test_parity_with_hf_dinov2_registers(dinov2_registers, base, hw):
  """Registers model: antialiased bicubic position resampling (a=-0.5), registers after CLS."""
  folder, model = dinov2_registers
  cfg, params = convert.load_dinov2(folder, base)
  assert cfg.pos_interp_antialias and cfg.num_register_tokens == 3
  x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(5))
  with torch.no_grad():
    ref = model(x).last_hidden_state.numpy()
  out = _apply(cfg, params, x)
  assert out.last_hidden_state.shape == ref.shape
  assert _rel_err(out.last_hidden_state, ref) <= 1e-5
  assert out.patch_tokens.shape[1] == (hw[0] // 8) * (hw[1] // 8)


def test_parity_with_hf_dinov2_swiglu(tmp_path_factory, base):
  folder, model = _hf_folder(tmp_path_factory, registers=False, swiglu=True, seed=2)
  cfg, params = convert.load_dinov2(folder, base)
  x = torch.randn(1, 3, 40, 40, generator=torch.Generator().manual_seed(6))
  with torch.no_grad():
    ref = model(x).last_hidden_state.numpy()
  assert _rel_err(_apply(cfg, params, x).last_hidden_state, ref) <= 1e-5


@pytest.mark.parametrize("which", ["dinov2", "dinov2_registers"])
def test_folder_round_trip_bit_identical(request, which, base, tmp_path):
  import transformers
  folder, model = request.getfixturevalue(which)
  cfg, params = convert.load_dinov2(folder, base)
  convert.save_dinov2(params, cfg, tmp_path)
  original, written = keymap.load_safetensors(folder), keymap.load_safetensors(tmp_path)
  assert set(original) == set(written)
  for k in original:
    np.testing.assert_array_equal(written[k], original[k])
  cls = type(model)
  reloaded, info = cls.from_pretrained(tmp_path, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  assert isinstance(reloaded.config, (transformers.Dinov2Config,
                                      transformers.Dinov2WithRegistersConfig))
  cfg2, params2 = convert.load_dinov2(tmp_path, base)
  assert cfg2.to_dict() == cfg.to_dict()
  for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_reusable_as_random_one_channel_prompt_encoder(base):
  """Issue 4's spatial-aware encoder: 1 input channel, own patch size, random init, no mask."""
  cfg = base.copy_and_resolve_references()
  cfg.update(in_channels=1, patch_size=4, pretrain_image_size=16, use_mask_token=False,
             hidden_size=8, num_heads=2, num_layers=1)
  module = vit_lib.ViT(cfg)
  maps = jnp.zeros([3, 16, 16, 1]).at[:, 4:9, 2:7].set(1.0)
  variables = jax.jit(module.init)(jax.random.key(0), maps)
  assert "mask_token" not in variables["params"]
  out = jax.jit(module.apply)(variables, maps)
  assert out.patch_tokens.shape == (3, 16, 8) and out.cls.shape == (3, 8)
  grads = jax.jit(jax.grad(lambda v: jnp.sum(module.apply(v, maps).cls ** 2)))(variables)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert np.abs(nn.meta.unbox(grads)["params"]["patch_embed"]["kernel"]).sum() > 0
  with pytest.raises(ValueError, match="use_mask_token=False"):
    module.apply(variables, maps, bool_masked_pos=jnp.zeros([3, 16], bool))
  with pytest.raises(ValueError, match=r"expected \[B, H, W, 1\]"):
    module.apply(variables, jnp.zeros([3, 16, 16, 3]))


# ----------------------------------------------------------------------------------------------
# The mixed encoder.


@pytest.fixture(scope="module")
def mixed():
  cfg = fusion.get_config("tiny").model.vision
  module = vision_lib.MixedVisionEncoder(cfg)
  pixels = jax.random.uniform(jax.random.key(1), [2, 1 + cfg.max_tiles, cfg.image_size,
                                                  cfg.image_size, 3])
  # Random values on init's shapes: compiling `init` (its RNG) costs more than the forward.
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), pixels))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
      lambda s: jnp.asarray(rng.normal(0.0, 0.5 / max(1, np.prod(s.shape[:-1])) ** 0.5,
                                       s.shape), s.dtype), shapes)
  tokens, dense, _ = jax.jit(module.apply)(variables, pixels)
  return cfg, module, variables, pixels, tokens, dense


def test_mixed_encoder_shapes_are_static_per_config(mixed):
  cfg, _, _, pixels, tokens, dense = mixed
  g, v = cfg.token_grid, 1 + cfg.max_tiles
  assert tokens.shape == (2, v * g * g, vision_lib.token_channels(cfg))
  assert dense.shape == (2, *vision_lib.dense_shape(cfg))
  paper = fusion.get_config("paper").model.vision
  assert vision_lib.token_channels(paper) == 1536 + 1024
  assert vision_lib.dense_shape(paper) == (28, 28, 768)


def test_mixed_encoder_is_both_encoders_concatenated(mixed):
  """Tokens = [ConvNeXt last stage | DINOv2 patches], each on its own mean / std, resized to
  the token grid; dense = the global view's ConvNeXt stage-2 map."""
  cfg, _, variables, pixels, tokens, dense = mixed
  params = variables["params"]
  b, v, s = pixels.shape[0], pixels.shape[1], cfg.image_size
  x = pixels.reshape(b * v, s, s, 3)
  c = cfg.convnext
  conv = jax.jit(convnext_lib.ConvNeXt(c).apply)(
      {"params": params["convnext"]},
      (x - jnp.asarray(c.image_mean)) / jnp.asarray(c.image_std))
  d = cfg.dino
  dino = jax.jit(vit_lib.ViT(d).apply)({"params": params["dino"]},
                                       (x - jnp.asarray(d.image_mean)) / jnp.asarray(d.image_std))
  g = cfg.token_grid
  assert conv.stages[-1].shape[1:3] == (2, 2) and dino.grid == (8, 8)  # grown / shrunk to 4x4
  conv_tokens = jax.image.resize(conv.stages[-1], (b * v, g, g, c.dims[-1]), "linear")
  dino_tokens = jax.image.resize(dino.patch_tokens.reshape(b * v, 8, 8, -1),
                                 (b * v, g, g, d.hidden_size), "linear", antialias=True)
  expected = jnp.concatenate([conv_tokens, dino_tokens], -1).reshape(b, v * g * g, -1)
  np.testing.assert_allclose(tokens, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dense, conv.stages[2].reshape(b, v, *dense.shape[1:])[:, 0],
                             rtol=1e-5, atol=1e-5)


def test_mixed_encoder_rejects_wrong_views(mixed):
  cfg, module, variables, _, _, _ = mixed
  with pytest.raises(ValueError, match="pixel_values: expected"):
    module.apply(variables, jnp.zeros([1, 3, cfg.image_size + 1, cfg.image_size, 3]))


def test_load_pretrained_fills_both_encoders(mixed, tmp_path):
  cfg, _, variables, _, _, _ = mixed
  params = variables["params"]
  convert.save_dinov2(params["dino"], cfg.dino, tmp_path / "dino")
  convert.save_convnext(params["convnext"], cfg.convnext, tmp_path / "convnext.safetensors")
  cfg = cfg.copy_and_resolve_references()
  cfg.dino.pretrained_path = str(tmp_path / "dino")
  cfg.convnext.pretrained_path = str(tmp_path / "convnext.safetensors")
  fresh = jax.tree.map(jnp.zeros_like, params)
  loaded = convert.load_pretrained(cfg, fresh)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  cfg.dino.num_heads = 4
  with pytest.raises(keymap.ConversionError, match="model.vision.dino.num_heads=4"):
    convert.load_pretrained(cfg, fresh)
