"""The sharded train step: 8-device mesh == 1 device, NaN safety, restore across meshes, LoRA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from earthgptx_jax import checkpointing, sharding, trainer
from model_fixtures import random_batch, tiny_config

NUM_TASKS = 3


def _setup(config, mesh):
  model = trainer.build_model(config)
  optimizer = trainer.make_optimizer(config, model)
  state, state_sh = trainer.create_state(model, optimizer, config, mesh, jax.random.key(0))
  step = trainer.make_train_step(model, optimizer, config, mesh, state_sh, NUM_TASKS)
  return model, optimizer, state, state_sh, step


@pytest.fixture(scope="module")
def config():
  # warmup 0: the first step moves the params (warmup starts at lr 0). Adam's first update is
  # lr * g / (|g| + eps); eps 1e-3 keeps it from amplifying the fp32 reduction-order noise of
  # gradients near 0 (with eps 1e-8 such elements differed by up to ~lr between meshes).
  # The per-leaf optimizer: its moments are sharded like the params, as in the presets that
  # shard (tiny's flat optimizer is checked against it in test_optim.py).
  return tiny_config(warmup_steps=0, adam_eps=1e-3, flat_optimizer=False)


@pytest.fixture(scope="module")
def mesh_1():
  return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def mesh_8():
  assert jax.device_count() == 8, "conftest sets 8 XLA host devices"
  return sharding.make_mesh((2, 2, 2))


@pytest.fixture(scope="module")
def single(config, mesh_1):
  return _setup(config, mesh_1)


@pytest.fixture(scope="module")
def sharded(config, mesh_8):
  return _setup(config, mesh_8)


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def test_params_are_split_across_fsdp_and_tensor(sharded):
  _, _, state, state_sh, _ = sharded
  specs = [s.spec for s in jax.tree.leaves(state_sh.trainable)]
  axes_used = {a for spec in specs for part in spec if part
               for a in (part if isinstance(part, tuple) else (part,))}
  assert {"fsdp", "tensor"} <= axes_used
  embed = state.params["llm"]["embed_tokens"]["embedding"]
  assert len(embed.sharding.device_set) == 8
  assert embed.addressable_shards[0].data.shape != embed.shape


def test_sharded_step_equals_single_device(config, single, sharded, mesh_1, mesh_8):
  batch = random_batch(config, config.train.batch_size, seed=1)
  *_, state_1, _, step_1 = single
  *_, state_8, _, step_8 = sharded
  np.testing.assert_array_equal(_host(state_1.params)["llm"]["norm"]["weight"],
                                _host(state_8.params)["llm"]["norm"]["weight"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=0),
               _host(state_1.trainable), _host(state_8.trainable))
  new_1, m_1 = step_1(jax.tree.map(jnp.copy, state_1),
                      trainer.global_batch(batch, config, mesh_1))
  new_8, m_8 = step_8(jax.tree.map(jnp.copy, state_8),
                      trainer.global_batch(batch, config, mesh_8))
  for key in ("loss", "ce", "mask_bce", "mask_dice", "grad_norm"):
    np.testing.assert_allclose(float(m_1[key]), float(m_8[key]), rtol=2e-5, err_msg=key)
  assert float(m_1["masks"]) == config.train.batch_size
  before = _host(state_1.trainable)
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), before, _host(new_1.trainable))
  # Adam's first step moves each parameter with a gradient by about the learning rate.
  assert max(jax.tree.leaves(moved)) > 0.5 * config.train.learning_rate
  step_tol = 1e-3 * config.train.learning_rate  # a thousandth of a step
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=step_tol),
               _host(new_1.trainable), _host(new_8.trainable))


def test_non_finite_loss_skips_update(config, single, mesh_1):
  *_, state, _, step = single
  batch = random_batch(config, config.train.batch_size, seed=2)
  batch["pixel_values"][0, 0, 0, 0, 0] = np.nan
  before = _host(state.trainable)
  new, metrics = step(jax.tree.map(jnp.copy, state), trainer.global_batch(batch, config, mesh_1))
  assert bool(metrics["update_skipped"])
  assert int(new.skipped_steps) == 1 and int(new.step) == 1
  jax.tree.map(np.testing.assert_array_equal, before, _host(new.trainable))


def test_restore_onto_other_meshes(tmp_path, config, sharded):
  model, optimizer, state_8, _, _ = sharded
  ckpt = checkpointing.Checkpointer(tmp_path / "ckpt", config.checkpoint)
  ckpt.save(3, state_8, config=config)
  ckpt.wait()
  want = _host(state_8)
  for shape, devices in (((8, 1, 1), jax.devices()), ((1, 1, 1), jax.devices()[:1])):
    mesh = sharding.make_mesh(shape, devices=devices)
    abstract, shardings = trainer.state_shardings(model, optimizer, config, mesh)
    step, restored = ckpt.restore_latest(checkpointing.abstract_with_shardings(abstract,
                                                                               shardings))
    assert step == 3
    jax.tree.map(np.testing.assert_array_equal, want, _host(restored))
    leaf = restored.params["llm"]["embed_tokens"]["embedding"]
    assert leaf.sharding.mesh.shape == mesh.shape
  ckpt.close()


@pytest.mark.slow
def test_lora_starts_at_base_and_trains_only_adapters(mesh_1):
  # No warmup: the first step must move the adapters (warmup starts at learning rate 0).
  config = tiny_config(frozen_patterns=(r"^params/llm/",), warmup_steps=0)
  config.train.lora.rank = 4
  model, _, state, _, step = _setup(config, mesh_1)
  merged = trainer.model_params(state.trainable, config)
  jax.tree.map(np.testing.assert_array_equal, _host(merged), _host(state.params))
  adapters = state.trainable["lora"]
  assert any(k.endswith("q_proj/kernel") for k in adapters)
  before = _host(state.trainable)
  new, _ = step(jax.tree.map(jnp.copy, state),
                trainer.global_batch(random_batch(config, config.train.batch_size, seed=4),
                                     config, mesh_1))
  after = _host(new.trainable)
  jax.tree.map(np.testing.assert_array_equal, before["params"]["llm"], after["params"]["llm"])
  assert any(not np.array_equal(before["lora"][k]["b"], after["lora"][k]["b"]) for k in adapters)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before["params"]["pixel"],
                         after["params"]["pixel"])
  assert any(jax.tree.leaves(changed)), "the unfrozen pixel decoder must train"


def test_step_counts_the_global_batch_tokens_on_device(config, single, sharded, mesh_1, mesh_8):
  """tokens/s comes from the step's `tokens` metric, summed on device over the global batch and
  replicated: no process fetches the global batch (it spans other processes' devices)."""
  batch = random_batch(config, config.train.batch_size, seed=3)
  expected = int(batch["attention_mask"].sum())
  for (*_, state, _, step), mesh in ((single, mesh_1), (sharded, mesh_8)):
    _, metrics = step(jax.tree.map(jnp.copy, state), trainer.global_batch(batch, config, mesh))
    assert metrics["tokens"].sharding.is_fully_replicated
    assert int(metrics["tokens"]) == expected
