"""Every attention implementation runnable here agrees with a float64 reference (and xla).

On CPU that is `xla`, `auto` (resolves to xla) and `pallas` (the GPU flash kernel in Pallas
interpret mode); `cudnn` runs only where a GPU is present. Cases: causal, key padding,
grouped-query heads, a length that is not a multiple of the kernel block, and gradients.
Outputs at padding queries are implementation-defined, so only real queries are compared.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from earthgptx_jax.models import attention, llama
from tests.model_fixtures import tiny_config

ON_GPU = jax.default_backend() == "gpu"
CPU_IMPLS = ("xla", "auto", "pallas")


def _reference(q, k, v, mask, causal):
  """float64 softmax(q k^T / sqrt(H)) v with GQA; mask: [B, S] key validity."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  allowed = np.ones(logits.shape, bool)
  if mask is not None:
    allowed &= mask[:, None, None, :]
  if causal:
    allowed &= np.tril(np.ones(logits.shape[-2:], bool))
  logits = np.where(allowed, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", p, v)


def _inputs(t=37, heads=4, kv_heads=2, head_dim=16, seed=0):
  """B=2; example 0 unpadded, example 1 with its last 9 keys padding."""
  rs = np.random.RandomState(seed)
  q = rs.randn(2, t, heads, head_dim).astype(np.float32)
  k = rs.randn(2, t, kv_heads, head_dim).astype(np.float32)
  v = rs.randn(2, t, kv_heads, head_dim).astype(np.float32)
  valid = np.ones((2, t), bool)
  valid[1, t - 9:] = False
  return q, k, v, valid


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("causal,padded", [(True, True), (False, True), (False, False)])
def test_forward_matches_reference(impl, causal, padded):
  q, k, v, valid = _inputs()
  mask = valid[:, None, None, :] if padded else None
  out = attention.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=impl)
  ref = _reference(q, k, v, valid if padded else None, causal)
  real = valid if padded else np.ones_like(valid)
  assert out.shape == q.shape
  np.testing.assert_allclose(np.asarray(out)[real], ref[real], atol=2e-6, rtol=1e-5)


def test_gradients_agree_pallas_vs_xla():
  """Causal + padding + GQA: d(loss)/d(q, k, v) through the kernel's custom VJP equals XLA's."""
  q, k, v, valid = _inputs(t=40)
  mask = valid[:, None, None, :]
  weight = jnp.asarray(np.random.RandomState(1).randn(*q.shape).astype(np.float32))
  weight = weight * valid[:, :, None, None]  # the loss sees real queries only

  def loss(impl, q, k, v):
    out = attention.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                          implementation=impl)
    return jnp.sum(out * weight)

  grads = {impl: jax.grad(lambda *a, impl=impl: loss(impl, *a), argnums=(0, 1, 2))(q, k, v)
           for impl in ("xla", "pallas")}
  for name, g_xla, g_pallas in zip("qkv", grads["xla"], grads["pallas"]):
    assert float(jnp.abs(g_xla).max()) > 1e-3, name  # the check is not vacuous
    np.testing.assert_allclose(g_pallas, g_xla, atol=1e-5, rtol=1e-4, err_msg=f"d/d{name}")


def test_llama_forward_pallas_equals_xla():
  """The LLM (its config's attention_impl) gives the same logits at real tokens either way."""
  cfg = tiny_config().model.llm
  ids = np.random.RandomState(0).randint(3, cfg.vocab_size, (2, 24))
  mask = np.ones_like(ids, bool)
  mask[1, 17:] = False
  cfg.attention_impl = "xla"
  model = llama.Llama(cfg)
  params = model.init(jax.random.key(0), ids[:, :4])
  logits = {}
  for impl in ("xla", "pallas"):
    cfg.attention_impl = impl
    logits[impl] = np.asarray(llama.Llama(cfg).apply(params, ids, attention_mask=mask).logits)
  np.testing.assert_allclose(logits["pallas"][mask], logits["xla"][mask], atol=1e-5, rtol=1e-5)


def test_pallas_rejects_what_the_kernel_cannot_express():
  q, k, v, valid = _inputs(t=8)
  with pytest.raises(ValueError, match="bias"):
    attention.dot_product_attention(q, k, v, bias=np.zeros((1, 1, 8, 8), np.float32),
                                    implementation="pallas")
  with pytest.raises(ValueError, match="key padding"):
    attention.dot_product_attention(q, k, v, mask=np.ones((2, 1, 8, 8), bool),
                                    implementation="pallas")
  with pytest.raises(ValueError, match="T == S"):
    attention.dot_product_attention(q[:, :4], k, v, implementation="pallas")


@pytest.mark.skipif(not ON_GPU, reason="cuDNN flash attention needs a GPU backend")
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_matches_xla_bf16(causal):
  q, k, v, valid = _inputs(t=64)
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  mask = valid[:, None, None, :]
  out = {impl: np.asarray(attention.dot_product_attention(
      q, k, v, mask=mask, is_causal=causal, implementation=impl), np.float32)
         for impl in ("xla", "cudnn", "auto", "pallas")}
  for impl in ("cudnn", "auto", "pallas"):
    np.testing.assert_allclose(out[impl][valid], out["xla"][valid], atol=2e-2, rtol=2e-2,
                               err_msg=impl)
