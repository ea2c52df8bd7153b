"""LLaMA on the 8-device CPU mesh: params really split over fsdp/tensor, results = 1 device.

One jitted loss/grad step (its logits as aux) runs on one device and on a (2, 2, 2) mesh.
"""

import numpy as np
import pytest

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from configs import fusion
from earthgptx_jax import sharding
from earthgptx_jax.models import llama

MESH_SHAPE = (2, 2, 2)  # data, fsdp, tensor


def _loss(model, params, ids, mask):
  out = model.apply({"params": params}, ids[:, :-1], attention_mask=mask[:, :-1])
  ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, ids[:, 1:])
  weight = mask[:, 1:].astype(jnp.float32)
  return jnp.sum(ce * weight) / jnp.sum(weight), out.logits


@pytest.fixture(scope="module")
def run():
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)")
  cfg = fusion.get_config("tiny").model.llm
  cfg.scan_layers = True  # the production layout: stacked layers
  cfg.remat = True
  model = llama.Llama(cfg)
  rs = np.random.RandomState(0)
  ids = jnp.asarray(rs.randint(0, cfg.vocab_size, (8, 17)), jnp.int32)
  mask = jnp.asarray(np.arange(17)[None] < rs.randint(9, 18, (8, 1)))

  boxed = jax.eval_shape(model.init, jax.random.key(0), ids)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), ids))["params"]
  grad_fn = jax.value_and_grad(lambda p, i, m: _loss(model, p, i, m), has_aux=True)
  (single_loss, single_logits), single_grads = jax.jit(grad_fn)(params, ids, mask)

  mesh = sharding.make_mesh(MESH_SHAPE)
  param_shardings = sharding.logical_to_shardings(nn.get_partition_spec(boxed), mesh)["params"]
  batch_sh = sharding.batch_sharding(mesh, 2)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_axis_rules()):
    sharded_params = jax.device_put(params, param_shardings)
    sharded_grad = jax.jit(grad_fn, in_shardings=(param_shardings, batch_sh, batch_sh),
                           out_shardings=((sharding.replicated(mesh), batch_sh), param_shardings))
    (loss, logits), grads = sharded_grad(sharded_params, jax.device_put(ids, batch_sh),
                                         jax.device_put(mask, batch_sh))
  return dict(cfg=cfg, sharded_params=sharded_params, grads=grads, loss=loss, logits=logits,
              single=(single_loss, single_grads, single_logits))


def test_params_are_split_over_fsdp_and_tensor(run):
  cfg = run["cfg"]
  p = run["sharded_params"]
  q = p["layers"]["self_attn"]["q_proj"]["kernel"]  # [layers, embed, heads, head_dim]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (cfg.num_layers, cfg.hidden_size // 2,
                                                cfg.num_heads // 2, cfg.head_dim)
  down = p["layers"]["mlp"]["down_proj"]["kernel"]  # [layers, mlp, embed]
  assert down.addressable_shards[0].data.shape == (cfg.num_layers, cfg.intermediate_size // 2,
                                                   cfg.hidden_size // 2)
  emb = p["embed_tokens"]["embedding"]  # [vocab, embed]
  assert emb.addressable_shards[0].data.shape == (cfg.vocab_size // 2, cfg.hidden_size // 2)
  # Every device holds 1/4 of each 2-D-split tensor: the state is spread, not replicated.
  total = sum(x.size for x in jax.tree.leaves(p))
  per_device = sum(x.addressable_shards[0].data.size for x in jax.tree.leaves(p))
  assert per_device < 0.3 * total
  # Gradients come back with the params' shardings.
  assert run["grads"]["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec == q.sharding.spec


def test_sharded_equals_single_device(run):
  single_loss, single_grads, single_logits = run["single"]
  np.testing.assert_allclose(run["logits"], single_logits, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(run["loss"], single_loss, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(run["grads"]), jax.tree.leaves(single_grads)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
