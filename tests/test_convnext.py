"""ConvNeXt trunk: parity with open_clip / timm and HF ConvNext, conversion round trips."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import linen as nn

from configs import fusion
from earthgptx_jax.convert import keymap
from earthgptx_jax.convert import vision as convert
from earthgptx_jax.models import convnext as convnext_lib

DEPTHS, DIMS = (1, 2, 2, 1), (8, 16, 24, 32)


def _rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _randomise(module: torch.nn.Module, seed: int) -> None:
  """Random weights everywhere, layer scales and norms included (defaults would hide bugs:
  a 1e-6 layer scale makes every block an identity)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith(("gamma", "layer_scale_parameter")) or p.ndim == 1 and "norm" in name:
        p.copy_(0.5 + torch.rand(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p[0].numel()) ** 0.5))


@pytest.fixture(scope="module")
def base():
  cfg = fusion.get_config("tiny").model.vision.convnext
  return cfg


@pytest.fixture(scope="module")
def open_clip_visual():
  """open_clip's CLIP-ConvNeXt visual tower (convnext_large_d_320's TimmModel), shrunk."""
  import open_clip.timm_model
  import timm
  create = timm.create_model
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(timm, "create_model", functools.partial(create, depths=DEPTHS, dims=DIMS))
    visual = open_clip.timm_model.TimmModel("convnext_large", embed_dim=16, image_size=64,
                                            pool="", proj="mlp", drop=0.0, drop_path=0.1)
  _randomise(visual, 0)
  return visual.eval()


@pytest.fixture(scope="module")
def clip_file(open_clip_visual, tmp_path_factory):
  """A whole-CLIP-layout checkpoint file: visual trunk + projection head + a text tensor."""
  state = {f"visual.{k}": v for k, v in open_clip_visual.state_dict().items()}
  state["logit_scale"] = torch.tensor(4.6)
  state["token_embedding.weight"] = torch.zeros(8, 16)
  path = tmp_path_factory.mktemp("clip") / "open_clip_model.safetensors"
  from safetensors.torch import save_file
  save_file(state, str(path))
  return path


@pytest.fixture(scope="module")
def loaded(clip_file, base):
  return convert.load_convnext(clip_file, base)


def _forward(cfg, params, x_nchw):
  x = jnp.asarray(x_nchw.permute(0, 2, 3, 1).numpy())
  return jax.jit(convnext_lib.ConvNeXt(cfg).apply)({"params": params}, x)


# Native (open_clip image_size) and not; both depthwise-conv implementations.
@pytest.mark.parametrize("hw,depthwise_impl", [((64, 64), "shift"), ((96, 80), "shift"),
                                               ((96, 80), "xla")])
def test_parity_with_open_clip_trunk(open_clip_visual, loaded, hw, depthwise_impl):
  cfg, params = loaded
  cfg = cfg.copy_and_resolve_references()
  cfg.depthwise_impl = depthwise_impl
  assert cfg.depths == DEPTHS and cfg.dims == DIMS and cfg.layer_scale_init is not None
  x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    ref_stages = open_clip_visual.trunk.forward_intermediates(x, intermediates_only=True)
    ref_pooled = open_clip_visual.trunk(x)
  out = _forward(cfg, params, x)
  assert len(out.stages) == len(ref_stages) == 4
  for ours, ref in zip(out.stages, ref_stages):
    assert _rel_err(ours, ref.permute(0, 2, 3, 1).numpy()) <= 1e-5
  assert _rel_err(out.pooled, ref_pooled.numpy()) <= 1e-5


def test_open_clip_and_timm_round_trip_bit_identical(open_clip_visual, loaded, clip_file,
                                                     tmp_path):
  cfg, params = loaded
  trunk = {k: v.numpy() for k, v in open_clip_visual.trunk.state_dict().items()}
  out = tmp_path / "clip_trunk.safetensors"
  convert.save_convnext(params, cfg, out, layout="open_clip")
  written = keymap.load_safetensors(out)
  assert set(written) == {convert.OPEN_CLIP_TRUNK_PREFIX + k for k in trunk}
  for k, v in trunk.items():
    np.testing.assert_array_equal(written[convert.OPEN_CLIP_TRUNK_PREFIX + k], v)
  # timm layout (bare keys) in bf16: dtype kept, values bit-identical both ways.
  bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in trunk.items()}
  timm_file = tmp_path / "timm.safetensors"
  convert.save_convnext(convert.keymap.to_flax(bf16, convert.convnext_rules(cfg)), cfg, timm_file)
  cfg2, params2 = convert.load_convnext(timm_file, cfg)
  assert cfg2.to_dict() == cfg.to_dict()
  for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(convert.keymap.to_flax(
      bf16, convert.convnext_rules(cfg)))):
    assert a.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))
  # ... and open_clip itself loads what we wrote.
  reloaded = {k[len(convert.OPEN_CLIP_TRUNK_PREFIX):]: torch.from_numpy(v)
              for k, v in written.items()}
  open_clip_visual.trunk.load_state_dict(reloaded, strict=True)


# timm's other stems: a stride-2 patch stem (timm then downsamples stage 0 too), the 1x1 one
# (stage 0 at full resolution) and the three overlapping 3x3 stems.
@pytest.mark.parametrize("stem_type,patch_size", [("patch", 2), ("patch", 1), ("overlap", 4),
                                                  ("overlap_tiered", 4), ("overlap_act", 4)])
def test_timm_stems_parity_and_round_trip(base, stem_type, patch_size, tmp_path):
  import timm.models.convnext
  from safetensors.torch import save_file
  model = timm.models.convnext.ConvNeXt(depths=DEPTHS, dims=(16, 16, 24, 32), num_classes=0,
                                        stem_type=stem_type, patch_size=patch_size,
                                        ls_init_value=1e-6)
  _randomise(model, 4)
  model.eval()
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  save_file(state, str(tmp_path / "trunk.safetensors"))
  cfg, params = convert.load_convnext(tmp_path / "trunk.safetensors", base)
  assert (cfg.stem_type, cfg.patch_size) == (stem_type, patch_size)
  assert [convnext_lib.total_stride(cfg, i) for i in range(4)] == [
      info["reduction"] for info in model.feature_info]
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
  with torch.no_grad():
    ref_stages = model.forward_intermediates(x, intermediates_only=True)
    ref_pooled = model(x)
  out = _forward(cfg, params, x)
  for ours, ref in zip(out.stages, ref_stages, strict=True):
    assert _rel_err(ours, ref.permute(0, 2, 3, 1).numpy()) <= 1e-5
  assert _rel_err(out.pooled, ref_pooled.numpy()) <= 1e-5
  # Written back: the same tensors, and timm loads them strictly.
  convert.save_convnext(params, cfg, tmp_path / "written.safetensors")
  written = keymap.load_safetensors(tmp_path / "written.safetensors")
  assert set(written) == set(state)
  for k, v in state.items():
    np.testing.assert_array_equal(written[k], v.numpy())
  model.load_state_dict({k: torch.from_numpy(v) for k, v in written.items()}, strict=True)
  # HF's ConvNext has no overlap stems and never downsamples stage 0: no HF folder for these.
  if stem_type != "patch" or patch_size == 2:
    with pytest.raises(keymap.ConversionError, match="no HF ConvNext equivalent"):
      convert.save_convnext(params, cfg, tmp_path / "hf", layout="hf")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  from transformers import ConvNextConfig, ConvNextModel
  model = ConvNextModel(ConvNextConfig(depths=list(DEPTHS), hidden_sizes=list(DIMS),
                                       layer_scale_init_value=1e-6))
  _randomise(model, 2)
  folder = tmp_path_factory.mktemp("hf_convnext")
  model.save_pretrained(folder)
  return folder, model.eval()


@pytest.mark.parametrize("hw", [(64, 64), (72, 104)])
def test_parity_with_hf_convnext(hf_folder, base, hw):
  folder, model = hf_folder
  cfg, params = convert.load_convnext(folder, base)
  assert cfg.head_norm_eps == 1e-12
  x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(3))
  with torch.no_grad():
    ref = model(x, output_hidden_states=True)
  out = _forward(cfg, params, x)
  for ours, theirs in zip(out.stages, ref.hidden_states[1:]):
    assert _rel_err(ours, theirs.permute(0, 2, 3, 1).numpy()) <= 1e-5
  assert _rel_err(out.pooled, ref.pooler_output.numpy()) <= 1e-5


def test_hf_folder_with_a_stride_2_stem_is_refused(tmp_path):
  """HF's ConvNext keeps stage 0 at the stem's stride 2; timm (and this trunk) downsample it, so
  loading it would silently build another network."""
  from transformers import ConvNextConfig, ConvNextModel
  ConvNextModel(ConvNextConfig(depths=[1, 1], hidden_sizes=[8, 16], num_stages=2, patch_size=2)
                ).save_pretrained(tmp_path)
  with pytest.raises(keymap.ConversionError, match="patch_size=2 has no HF ConvNext equivalent"):
    convert.load_convnext(tmp_path, fusion.get_config("tiny").model.vision.convnext)


def test_hf_folder_round_trip(hf_folder, base, tmp_path):
  from transformers import ConvNextModel
  folder, model = hf_folder
  cfg, params = convert.load_convnext(folder, base)
  convert.save_convnext(params, cfg, tmp_path, layout="hf")
  original, written = keymap.load_safetensors(folder), keymap.load_safetensors(tmp_path)
  assert set(original) == set(written)
  for k in original:
    np.testing.assert_array_equal(written[k], original[k])
  _, info = ConvNextModel.from_pretrained(tmp_path, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]


def test_bad_checkpoint_names_the_tensor(open_clip_visual, base, tmp_path):
  from safetensors.torch import save_file
  state = {k: v.clone() for k, v in open_clip_visual.trunk.state_dict().items()}
  state["stages.1.blocks.0.mlp.fc1.weight"] = torch.zeros(5, 16)
  save_file(state, str(tmp_path / "bad.safetensors"))
  with pytest.raises(keymap.ConversionError, match="stages.1.blocks.0.mlp.fc1.weight"):
    convert.load_convnext(tmp_path / "bad.safetensors", base)
  save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
  with pytest.raises(keymap.ConversionError, match="stem.0.weight"):
    convert.load_convnext(tmp_path / "other.safetensors", base)


def test_params_carry_logical_axes_and_bad_input_raises(base):
  module = convnext_lib.ConvNeXt(base)
  variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros([1, 32, 32, 3]))
  boxed = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert boxed and all(isinstance(x, nn.Partitioned) for x in boxed)
  with pytest.raises(ValueError, match=r"expected \[B, H, W, 3\]"):
    module.init(jax.random.key(0), jnp.zeros([1, 32, 32, 1]))
  with pytest.raises(ValueError, match="must be >= 32 pixels"):
    module.init(jax.random.key(0), jnp.zeros([1, 16, 16, 3]))
  for field, value in (("stem_type", "conv"), ("patch_size", 2)):
    cfg = base.copy_and_resolve_references()
    cfg.stem_type = "overlap_act"
    cfg[field] = value
    with pytest.raises(ValueError, match=f"convnext.{field}: .*{value}"):
      convnext_lib.ConvNeXt(cfg).init(jax.random.key(0), jnp.zeros([1, 64, 64, 3]))


def test_remat_shift_gradient_and_bf16(base):
  """remat + the shifted-add depthwise conv (custom VJP) give the plain XLA conv's gradients;
  bf16 compute stays close to fp32."""
  cfg = base.copy_and_resolve_references()
  cfg.depths = (1, 1, 1, 1)
  x = jax.random.uniform(jax.random.key(0), [1, 32, 32, 3])
  shapes = nn.meta.unbox(jax.eval_shape(convnext_lib.ConvNeXt(cfg).init, jax.random.key(0), x))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape), s.dtype),
                        shapes)["params"]

  def variant(**changes):
    c = cfg.copy_and_resolve_references()
    c.update(changes)
    return convnext_lib.ConvNeXt(c)

  def grads(module):
    return jax.jit(jax.grad(
        lambda p: jnp.sum(module.apply({"params": p}, x).pooled ** 2)))(params)

  g_plain = grads(variant(remat=False, depthwise_impl="xla"))
  g_remat = grads(variant(remat=True, depthwise_impl="shift"))
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
    assert _rel_err(b, a) <= 1e-4
  ref = jax.jit(variant().apply)({"params": params}, x)
  low = jax.jit(variant(dtype="bfloat16").apply)({"params": params}, x)
  assert low.stages[-1].dtype == jnp.bfloat16
  assert _rel_err(low.stages[-1].astype(jnp.float32), ref.stages[-1]) < 5e-2
