"""Gradient accumulation keeps every device's rows on that device (8 host devices, conftest.py).

Micro-batch i is rows i, i + A, ... of the batch (trainer.make_grads_fn), so a batch sharded
over `data` splits into micro-batches without moving rows: the compiled step holds no
all-gather / all-to-all (with a data-parallel mesh, parameters are replicated, so any would be
the batch's). Accumulated gradients equal the one-pass gradients when every micro-batch is the
same examples.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import linen as nn

from earthgptx_jax import batch as batch_lib
from earthgptx_jax import sharding, trainer
from tests.model_fixtures import random_batch, tiny_config

NUM_TASKS = 4


@pytest.fixture(scope="module")
def mesh():
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)")
  return sharding.make_mesh((8, 1, 1), devices=jax.devices()[:8])


@pytest.mark.slow
def test_accumulation_moves_no_rows_between_devices(mesh):
  config = tiny_config(batch_size=16, grad_accum_steps=2)
  model = trainer.build_model(config)
  optimizer = trainer.make_optimizer(config, model)
  abstract, state_sh = trainer.state_shardings(model, optimizer, config, mesh)
  step = trainer.make_train_step(model, optimizer, config, mesh, state_sh, NUM_TASKS)
  batch = {k: jax.ShapeDtypeStruct(s, d, sharding=sharding.batch_sharding(mesh, len(s)))
           for k, (s, d) in batch_lib.batch_shapes(config, 16).items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    hlo = step.jitted.lower(abstract, batch).compile().as_text()
  assert "all-reduce" in hlo  # the gradients' (the check reads the partitioned program)
  assert "all-gather" not in hlo and "all-to-all" not in hlo


@pytest.mark.slow
def test_accumulated_grads_equal_one_pass(mesh):
  config = tiny_config(batch_size=16)
  accum_config = tiny_config(batch_size=16, grad_accum_steps=2)
  model = trainer.build_model(config)
  state, _ = trainer.create_state(model, trainer.make_optimizer(config, model), config, mesh,
                                  jax.random.key(0))
  # Each example twice in a row: both strided micro-batches are the same 8 examples, so their
  # per-micro-batch means equal the whole batch's.
  half = random_batch(config, 8, seed=5)
  batch = trainer.global_batch({k: np.repeat(v, 2, axis=0) for k, v in half.items()}, config,
                               mesh)
  out = []
  for cfg in (config, accum_config):
    grads_fn = jax.jit(trainer.make_grads_fn(model, cfg, NUM_TASKS, mesh))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
      out.append(jax.tree.map(np.asarray, grads_fn(state.trainable, batch)))
  (g_one, m_one), (g_acc, m_acc) = out
  np.testing.assert_allclose(m_one["loss"], m_acc["loss"], rtol=1e-5)
  assert m_one["answer_tokens"] == m_acc["answer_tokens"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_one, g_acc)
