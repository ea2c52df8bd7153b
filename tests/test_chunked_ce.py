"""The chunked cross-entropy (no [B, L, V] logits) equals the plain one: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import fusion
from earthgptx_jax import losses
from earthgptx_jax.models import llama


def _plain(hidden, kernel, targets, mask):
  logits = jnp.einsum("bld,dv->blv", hidden, kernel)
  return losses.token_cross_entropy(logits, targets, mask)[0]


@pytest.mark.parametrize("chunk", [1, 3, 5, 16])
def test_chunked_ce_matches_plain_values_and_grads(chunk):
  rs = np.random.RandomState(0)
  b, length, d, v = 2, 7, 6, 11  # chunks that do and do not divide L
  hidden = jnp.asarray(rs.randn(b, length, d).astype(np.float32))
  kernel = jnp.asarray(rs.randn(d, v).astype(np.float32))
  targets = jnp.asarray(rs.randint(0, v, (b, length)))
  mask = jnp.asarray(rs.rand(b, length) > 0.3)

  mean, loss_sum, count = losses.chunked_token_cross_entropy(hidden, kernel, targets, mask, chunk)
  want_sum, want_count = losses.token_cross_entropy_per_example(
      jnp.einsum("bld,dv->blv", hidden, kernel), targets, mask)
  np.testing.assert_allclose(mean, _plain(hidden, kernel, targets, mask), rtol=1e-6)
  np.testing.assert_allclose(loss_sum, want_sum, rtol=1e-6)
  np.testing.assert_array_equal(count, want_count)

  def chunked(h, k):
    return losses.chunked_token_cross_entropy(h, k, targets, mask, chunk)[0]

  got = jax.jit(jax.grad(lambda h, k: 3.0 * chunked(h, k), argnums=(0, 1)))(hidden, kernel)
  want = jax.grad(lambda h, k: 3.0 * _plain(h, k, targets, mask), argnums=(0, 1))(hidden, kernel)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_chunked_ce_without_answer_tokens_is_zero_with_zero_grads():
  hidden, kernel = jnp.ones((1, 4, 3)), jnp.ones((3, 5))
  targets, mask = jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4), bool)
  fn = lambda h, k: losses.chunked_token_cross_entropy(h, k, targets, mask, 2)[0]  # noqa: E731
  assert float(fn(hidden, kernel)) == 0.0
  for g in jax.grad(fn, argnums=(0, 1))(hidden, kernel):
    assert not np.any(np.asarray(g))


@pytest.mark.parametrize("tied", [False, True])
def test_llama_train_ce_chunked_equals_plain(tied):
  """llama.token_cross_entropy with ce_chunk_size > 0 gives the plain CE's loss and param grads."""
  cfg = fusion.get_config("tiny").model.llm
  cfg.update(dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=8, tie_word_embeddings=tied))
  rs = np.random.RandomState(1)
  ids = jnp.asarray(rs.randint(0, 50, (2, 9)))
  targets = jnp.asarray(rs.randint(0, 50, (2, 9)))
  mask = jnp.asarray(rs.rand(2, 9) > 0.4)
  params = nn.unbox(llama.Llama(cfg).init(jax.random.key(0), ids)["params"])

  def loss(params, chunk):
    c = cfg.copy_and_resolve_references()
    c.ce_chunk_size = chunk
    out = llama.Llama(c).apply({"params": params}, ids)
    return llama.token_cross_entropy(out, params, c, targets, mask)[0]

  got, got_grads = jax.jit(jax.value_and_grad(lambda p: loss(p, 4)))(params)
  want, want_grads = jax.value_and_grad(lambda p: loss(p, 0))(params)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("normalization", ["token", "example", "sqrt"])
def test_chunked_ce_differentiates_every_answer_ce_normalization(normalization):
  """train.answer_ce on the chunked path: its one differentiable output is the CE averaged as
  configured (the main job's 'sqrt' trained no text at all while the chunked path's gradient
  was the token mean's and the sums, which carry none, were averaged)."""
  rs = np.random.RandomState(1)
  b, length, d, v = 3, 9, 6, 11
  hidden = jnp.asarray(rs.randn(b, length, d).astype(np.float32))
  kernel = jnp.asarray(rs.randn(d, v).astype(np.float32))
  targets = jnp.asarray(rs.randint(0, v, (b, length)))
  mask = jnp.asarray(rs.rand(b, length) > np.array([[0.2], [0.8], [1.1]]))  # 3rd: no answer

  def plain(h, k):
    loss_sum, count = losses.token_cross_entropy_per_example(
        jnp.einsum("bld,dv->blv", h, k), targets, mask)
    return losses.answer_cross_entropy(loss_sum, count, normalization)

  def chunked(h, k):
    return losses.chunked_token_cross_entropy(h, k, targets, mask, 4, normalization)[0]

  np.testing.assert_allclose(chunked(hidden, kernel), plain(hidden, kernel), rtol=1e-6)
  got = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, kernel)
  want = jax.grad(plain, argnums=(0, 1))(hidden, kernel)
  assert float(jnp.abs(got[1]).max()) > 0
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
