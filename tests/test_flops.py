"""perf.training_flops (the MFU numerator) against what XLA and the traced program compute.

Two independent checks of the formula: per component, its forward matmul FLOPs equal the
dot_general / conv FLOPs of the traced forward pass whose Flax name stack lies in that
component; and in all, forward + backward agree with XLA's cost analysis of the lowered,
unrolled (scan_layers=False) gradient computation to a few % (XLA also counts elementwise work,
which the model-FLOPs convention leaves out).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from earthgptx_jax import batch as batch_lib
from earthgptx_jax import perf, trainer
from tests.model_fixtures import tiny_config

# Name-stack fragments (module paths) -> perf component; first match wins.
_COMPONENTS = (("vision/convnext", "convnext"), ("vision/dino", "dino"),
               ("prompt_encoder/", "sae"), ("region_encoder", "region"),
               ("integration", "integration"), ("/llm", "llm"),
               ("pixel/vision_encoder", "sam_vit"), ("pixel/dense_proj", "dense_proj"),
               ("pixel/seg_fc", "mask_decoder"), ("pixel/mask_decoder", "mask_decoder"),
               ("box_head", "box_head"))


def small_config(**overrides):
  """tiny with widths large enough for matmuls to dominate XLA's count; every component on."""
  config = tiny_config(**overrides)
  m = config.model
  m.llm.update(dict(hidden_size=256, intermediate_size=688, num_heads=4, num_kv_heads=2,
                    head_dim=64, vocab_size=1024))
  m.token_ids.update(dict(box=1020, image_patch=1021, vp_patch=1022, seg=1023))
  m.vision.convnext.update(dict(dims=(32, 64, 96, 128), depthwise_impl="xla"))
  m.vision.dino.update(dict(hidden_size=128, num_heads=2))
  m.prompt.update(dict(embed_dim=128, pool_mlp_dim=256, fusion_heads=2, fusion_mlp_dim=256))
  m.prompt.sae.update(dict(hidden_size=64))
  m.pixel.decoder.update(dict(hidden_size=64, mlp_dim=256, iou_head_hidden_dim=64))
  m.pixel.sam_vit.update(dict(hidden_size=128, mlp_dim=512))
  m.box.dim = 64
  # The plain CE, whose matmuls the formula counts. With the chunked CE's custom backward XLA's
  # count falls 7.6 % under the formula when groups are frozen (2 % over with the plain CE);
  # not yet explained, noted in issue 25's closing note.
  m.llm.ce_chunk_size = 0
  return config


def _jaxpr_matmul_flops(jaxpr, per_component, scale=1.0):
  """Adds 2 * MACs of every dot_general / conv in `jaxpr` (scan bodies x length) by component."""
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      flops = 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape  # flax: HWIO; I is already in_channels / groups
      flops = 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs[:-1])
    else:
      flops = 0.0
    if flops:
      stack = str(eqn.source_info.name_stack)
      key = next((c for frag, c in _COMPONENTS if frag in stack), "other")
      per_component[key] = per_component.get(key, 0.0) + flops * scale
    inner = scale * (eqn.params["length"] if name == "scan" else 1)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      _jaxpr_matmul_flops(sub, per_component, inner)


def _abstract(config, batch_size):
  model = trainer.build_model(config)
  trainable = nn.meta.unbox(jax.eval_shape(
      functools.partial(trainer._init_trainable, model, config), jax.random.key(0)))
  batch = {k: jax.ShapeDtypeStruct(s, d)
           for k, (s, d) in batch_lib.batch_shapes(config, batch_size).items()}
  return model, trainable, batch


# The tiny preset also with timm's other ConvNeXt stems: a stride-2 patch stem (which adds a
# stage-0 downsampling) and the overlapping 3x3 stems.
@pytest.mark.parametrize("preset,stem_type,patch_size", [
    ("tiny", "patch", 4), ("small", "patch", 4), ("tiny", "patch", 2), ("tiny", "overlap_act", 4),
    ("tiny", "overlap_tiered", 4)])
def test_forward_matmuls_per_component(preset, stem_type, patch_size):
  config = small_config() if preset == "small" else tiny_config()
  config.model.vision.convnext.update(stem_type=stem_type, patch_size=patch_size,
                                      depthwise_impl="xla")  # a conv XLA and the jaxpr can count
  batch_size = 2
  model, trainable, batch = _abstract(config, batch_size)
  jaxpr = jax.make_jaxpr(lambda t, b: model.apply({"params": t["params"]}, b))(trainable, batch)
  traced = {}
  _jaxpr_matmul_flops(jaxpr.jaxpr, traced)
  formula = perf.training_flops(config, batch_size, forward_only=True)
  for component, flops in traced.items():
    if component == "other":  # image resizes (views to the token grid, SAM input, masks)
      assert flops < 0.05 * formula["total"], traced
      continue
    np.testing.assert_allclose(formula[component], flops, rtol=0.01, err_msg=component)
  assert set(formula) - {"total"} == set(traced) - {"other"}


def test_formula_paths_name_real_parameters():
  config = small_config(frozen_patterns=())
  _, trainable, _ = _abstract(config, 1)
  paths = {perf_path for perf_path in _param_paths(trainable)}
  for component in perf.model_components(config, 1):
    for op in component.ops:
      if op.weight is not None:
        assert any(p.startswith(op.weight) for p in paths), op.weight


def _param_paths(tree):
  from earthgptx_jax import optim
  return [optim.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _xla_grad_flops(config, batch_size):
  """XLA's count of the lowered (whole-program, unrolled) forward + backward of the losses,
  differentiating what the train step differentiates."""
  model, trainable, batch = _abstract(config, batch_size)
  grads = trainer.make_grads_fn(model, config, num_tasks=4)
  return perf.compiled_flops(jax.jit(grads).lower(trainable, batch))


@pytest.mark.parametrize("frozen", [(), (r"^params/vision/", r"^params/llm/.*/mlp/",
                                         r"^params/pixel/vision_encoder/")])
def test_training_flops_match_xla_unrolled(frozen):
  config = small_config(frozen_patterns=frozen)
  assert not config.model.llm.scan_layers and not config.model.llm.remat
  batch_size = 2
  xla = _xla_grad_flops(config, batch_size)
  formula = perf.training_flops(config, batch_size)["total"]
  assert abs(formula / xla - 1) < 0.06, (formula, xla)


def test_scanned_llm_counts_every_layer():
  """XLA counts a scan body once; the formula does not depend on scan_layers."""
  config = small_config()
  unrolled = perf.training_flops(config, 2)["llm"]
  config.model.llm.scan_layers = True
  assert perf.training_flops(config, 2)["llm"] == unrolled
  config.model.llm.num_layers = 4
  four = perf.training_flops(config, 2)["llm"]
  config.model.llm.num_layers = 0  # the LM head alone
  assert four - unrolled == pytest.approx(unrolled - perf.training_flops(config, 2)["llm"])


def test_frozen_groups_cost_less():
  config = small_config(frozen_patterns=())
  full = perf.training_flops(config, 2)
  frozen = perf.training_flops(config, 2, frozen_patterns=(r"^params/vision/",))
  # A frozen encoder at the input runs its forward only.
  fwd = perf.training_flops(config, 2, forward_only=True)
  assert frozen["convnext"] == fwd["convnext"] and frozen["dino"] == fwd["dino"]
  assert full["convnext"] == pytest.approx(3 * fwd["convnext"])
  # Frozen LLM MLPs still pass input gradients (the attention and what feeds the LLM train).
  mlp = perf.training_flops(config, 2, frozen_patterns=(r"^params/llm/.*/mlp/",))
  assert fwd["llm"] * 2 < mlp["llm"] < full["llm"]

