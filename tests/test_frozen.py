"""Frozen groups (train.frozen_patterns) cost no backward pass and no gradient.

The paper freezes the vision encoders and the LLM's MLPs. The train step must differentiate only
the trainable leaves: no transposed (backward) matmul inside a frozen encoder at the input, no
weight gradient for a frozen weight, a gradient norm over the trainable leaves; and the update
of the trainable leaves is the one differentiating everything would give.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import linen as nn

from earthgptx_jax import batch as batch_lib
from earthgptx_jax import optim, perf, sharding, trainer
from tests.model_fixtures import random_batch, tiny_config
from tests.test_flops import small_config

PAPER_FROZEN = (r"^params/vision/", r"^params/llm/.*/mlp/")
NUM_TASKS = 4


def _mesh():
  return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def _lowered_step(config, batch_size=2):
  """The real train step lowered on abstract state and batch (nothing is initialised)."""
  mesh = _mesh()
  model = trainer.build_model(config)
  optimizer = trainer.make_optimizer(config, model)
  abstract, state_sh = trainer.state_shardings(model, optimizer, config, mesh)
  step = trainer.make_train_step(model, optimizer, config, mesh, state_sh, NUM_TASKS)
  batch = {k: jax.ShapeDtypeStruct(s, d)
           for k, (s, d) in batch_lib.batch_shapes(config, batch_size).items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    lowered = step.jitted.lower(abstract, batch)
    jaxpr = jax.make_jaxpr(step.jitted)(abstract, batch)
  return lowered, jaxpr


def _backward_matmuls(jaxpr, fragment: str, found: list):
  """Names of transposed (backward) dot_general / conv eqns under module path `fragment`."""
  for eqn in jaxpr.eqns:
    stack = str(eqn.source_info.name_stack)
    if (eqn.primitive.name in ("dot_general", "conv_general_dilated") and "transpose" in stack
        and fragment in stack):
      found.append(stack)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      _backward_matmuls(sub, fragment, found)
  return found


def test_frozen_encoders_get_no_backward_pass():
  frozen_cfg = small_config(frozen_patterns=PAPER_FROZEN, batch_size=2)
  open_cfg = small_config(frozen_patterns=(), batch_size=2)
  frozen, frozen_jaxpr = _lowered_step(frozen_cfg)
  full, full_jaxpr = _lowered_step(open_cfg)
  frozen_flops, full_flops = perf.compiled_flops(frozen), perf.compiled_flops(full)
  # What the formula says the frozen groups save is what XLA no longer runs.
  saved = perf.training_flops(open_cfg)["total"] - perf.training_flops(frozen_cfg)["total"]
  assert saved > 0.1 * full_flops
  np.testing.assert_allclose(full_flops - frozen_flops, saved, rtol=0.05)
  assert _backward_matmuls(full_jaxpr.jaxpr, "vision/", [])  # the check sees backward matmuls
  assert not _backward_matmuls(frozen_jaxpr.jaxpr, "vision/", [])


@pytest.mark.slow
def test_frozen_step_gradients_equal_differentiating_everything():
  """Against the reference, differentiating every leaf: the same gradient for each trainable
  leaf, at each of three steps' states; frozen leaves never change, trainable ones do.

  Gradients, not the parameters after Adam, are compared: a leaf whose gradient is ~1e-10 (float
  noise) gets an Adam step of ~lr * g / eps that differs between any two summation orders."""
  config = tiny_config(frozen_patterns=(r"^params/vision/convnext/", r"^params/llm/.*/mlp/"),
                       warmup_steps=0)
  mesh = _mesh()
  model = trainer.build_model(config)
  optimizer = trainer.make_optimizer(config, model)
  state, state_sh = trainer.create_state(model, optimizer, config, mesh, jax.random.key(0))
  step = trainer.make_train_step(model, optimizer, config, mesh, state_sh, NUM_TASKS)
  live = optim.trainable_mask(state.trainable, tuple(config.train.frozen_patterns))

  @jax.jit
  def reference_grads(trainable, batch):
    return jax.grad(lambda t: trainer.compute_losses(model, config, t, batch, NUM_TASKS),
                    has_aux=True)(trainable)[0]

  grads_fn = jax.jit(step.grads_and_metrics)
  start = jax.tree.map(np.asarray, state.trainable)
  for seed in range(3):
    batch = trainer.global_batch(random_batch(config, config.train.batch_size, seed=seed),
                                 config, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
      want = reference_grads(state.trainable, batch)
      got, _ = grads_fn(state.trainable, batch)
    pairs = [(np.asarray(a), np.asarray(b)) for t, a, b in
             zip(jax.tree.leaves(live), jax.tree.leaves(want), jax.tree.leaves(got)) if t]
    # Float noise scaled to the gradient: some leaves' true gradient is 0 (noise ~1e-9).
    atol = 1e-5 * max(np.abs(a).max() for a, _ in pairs)
    for a, b in pairs:
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=atol)
    state, metrics = step(state, batch)
    assert not bool(metrics["update_skipped"])
  convnext = jax.tree.leaves(start["params"]["vision"]["convnext"])
  after = jax.tree.leaves(jax.tree.map(np.asarray, state.params["vision"]["convnext"]))
  assert all(np.array_equal(a, b) for a, b in zip(convnext, after))
  assert not np.array_equal(start["params"]["vision"]["dino"]["layers_0"]["fc1"]["kernel"],
                            np.asarray(state.params["vision"]["dino"]["layers_0"]["fc1"]["kernel"]))
