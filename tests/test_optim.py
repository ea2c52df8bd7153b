"""The flat optimizer (train.flat_optimizer) equals the per-leaf optax chain it replaces."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from earthgptx_jax import optim


def _train_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      steps=10, learning_rate=1e-2, warmup_steps=2, weight_decay=0.1, grad_clip_norm=0.5,
      frozen_patterns=(r"^frozen/",), flat_optimizer=False))
  config.update(overrides)
  return config


def _params(rng, dtype=np.float32):
  """Matrices (decayed), vectors (not decayed) and a frozen group; `dtype` for one matrix."""
  return {
      "frozen": {"kernel": rng.normal(size=(3, 4)).astype(np.float32)},
      "layer": {"kernel": rng.normal(size=(5, 3)).astype(np.float32),
                "bias": rng.normal(size=(3,)).astype(np.float32),
                "other": rng.normal(size=(2, 2)).astype(dtype)},
      "norm": {"scale": rng.normal(size=(7,)).astype(np.float32)},
  }


def _run(train_cfg, params, grads_seq):
  optimizer = optim.make_optimizer(train_cfg, params)
  state = optimizer.init(params)
  update = jax.jit(optimizer.update)
  for grads in grads_seq:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_flat_optimizer_equals_per_leaf_chain():
  rng = np.random.default_rng(0)
  params = _params(rng)
  # Large gradients so that the global-norm clip is active on every step.
  grads_seq = [jax.tree.map(lambda x: (10 * rng.normal(size=x.shape)).astype(x.dtype), params)
               for _ in range(5)]
  per_leaf = _run(_train_config(), params, grads_seq)
  flat = _run(_train_config(flat_optimizer=True), params, grads_seq)
  for a, b in zip(jax.tree.leaves(per_leaf), jax.tree.leaves(flat)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(flat["frozen"]["kernel"], params["frozen"]["kernel"])
  assert not np.allclose(flat["layer"]["kernel"], params["layer"]["kernel"])


def test_flat_optimizer_state_is_one_vector_per_group():
  params = _params(np.random.default_rng(1))
  state = optim.make_optimizer(_train_config(flat_optimizer=True), params).init(params)
  sizes = sorted(x.size for x in jax.tree.leaves(state) if x.ndim == 1)
  # mu and nu for the decayed group (5*3 + 2*2) and for the others (3 + 7); frozen has none.
  assert sizes == [10, 10, 19, 19]


def test_flat_updates_keep_each_leaf_dtype():
  # The flat moments are fp32 (jnp.concatenate promotes); a bf16 leaf's update is cast back.
  params = _params(np.random.default_rng(4), dtype=jnp.bfloat16)
  optimizer = optim.make_optimizer(_train_config(flat_optimizer=True), params)
  updates, _ = optimizer.update(params, optimizer.init(params), params)
  assert updates["layer"]["other"].dtype == jnp.bfloat16
  assert updates["layer"]["kernel"].dtype == jnp.float32


def test_global_norm_flat_equals_per_leaf():
  grads = _params(np.random.default_rng(2))
  expected = optax.global_norm(grads)
  got = optim.global_norm(_train_config(flat_optimizer=True), grads)
  np.testing.assert_allclose(float(got), float(expected), rtol=1e-6)


def test_flat_groups_rejects_another_tree():
  params = _params(np.random.default_rng(3))
  optimizer = optim.make_optimizer(_train_config(flat_optimizer=True), params)
  with pytest.raises(ValueError, match="leaves"):
    optimizer.init({"only": jnp.zeros(3)})
