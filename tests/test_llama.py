"""LLaMA module: parity with transformers' PyTorch Llama, cached decoding, dtypes, attention."""

import numpy as np
import pytest
import torch
import transformers

import jax
import jax.numpy as jnp
from configs import fusion
from earthgptx_jax.convert import llama as convert
from earthgptx_jax.models import attention, llama

# Several shapes the module must represent: MHA / GQA / MQA, tied / untied, RoPE default /
# llama3 / linear, head_dim != hidden / heads, odd vocab and MLP sizes.
HF_CONFIGS = {
    "mha_untied_odd": dict(vocab_size=97, hidden_size=36, intermediate_size=50,
                           num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3,
                           head_dim=12),
    "gqa_tied_llama3": dict(vocab_size=101, hidden_size=48, intermediate_size=70,
                            num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                            head_dim=8, tie_word_embeddings=True, rope_theta=500000.0,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 16}),
    "mqa_linear_wide_heads": dict(vocab_size=64, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=1, head_dim=12, rms_norm_eps=1e-5,
                                  rope_scaling={"rope_type": "linear", "factor": 2.0}),
}
SEQ = 24


def _hf_model(name, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(**HF_CONFIGS[name], max_position_embeddings=64)
  model = transformers.LlamaForCausalLM(cfg).eval()
  # Random (not default ~N(0, 0.02) / ones) norms so that a swapped or skipped weight shows.
  with torch.no_grad():
    for n, p in model.named_parameters():
      if "norm" in n:
        p.uniform_(0.5, 1.5)
  return model


def _base(scan=False, remat=False):
  base = fusion.get_config("tiny").model.llm
  base.scan_layers, base.remat = scan, remat
  return base


def _inputs(vocab, seed=0):
  rs = np.random.RandomState(seed)
  ids = rs.randint(0, vocab, (3, SEQ))
  mask = np.ones((3, SEQ), bool)
  mask[1, 17:] = False  # right padding
  mask[2, :6] = False  # left padding
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  return ids, mask, positions


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def pair(request, tmp_path_factory):
  """(torch model, converted config, params, torch reference outputs) for one config."""
  model = _hf_model(request.param)
  folder = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(folder)
  cfg, params = convert.load_hf_llama(folder, _base())
  ids, mask, positions = _inputs(cfg.vocab_size)
  with torch.no_grad():
    ref = model(torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                position_ids=torch.tensor(positions), output_hidden_states=True)
  ours = jax.jit(llama.Llama(cfg).apply)({"params": params}, jnp.asarray(ids), attention_mask=mask)
  return request.param, folder, cfg, params, (ids, mask, positions), ref, ours


def _assert_close(ours, ref, mask):
  ours, ref = np.asarray(ours)[mask], np.asarray(ref)[mask]
  diff = np.abs(ours - ref).max()
  rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
  assert diff <= 1e-4 and rel <= 1e-5, f"max|diff|={diff:.2e} rel={rel:.2e}"


def test_parity_with_transformers(pair):
  """fp32 logits and last hidden states match HF on real (non-padding) positions."""
  _, _, cfg, _, (_, mask, _), ref, out = pair
  assert out.logits.shape == (3, SEQ, cfg.vocab_size) and out.logits.dtype == jnp.float32
  _assert_close(out.logits, ref.logits.numpy(), mask)
  _assert_close(out.hidden_states, ref.hidden_states[-1].numpy(), mask)


def test_scanned_remat_layout_matches(pair):
  """scan_layers + remat give the same function (params stacked on a leading layer axis)."""
  _, folder, _, _, (ids, mask, _), ref, _ = pair
  cfg, params = convert.load_hf_llama(folder, _base(scan=True, remat=True))
  assert params["layers"]["mlp"]["up_proj"]["kernel"].shape[0] == cfg.num_layers
  out = jax.jit(llama.Llama(cfg).apply)({"params": params}, jnp.asarray(ids), attention_mask=mask)
  _assert_close(out.logits, ref.logits.numpy(), mask)


def test_cached_decoding_matches_full_forward(pair):
  """Feeding the sequence in chunks through the cache gives the full pass's logits everywhere.

  Chunks of 4 tokens exercise a multi-token causal block at a non-zero cache offset with
  padding on both sides; single-token steps are covered by tests/test_generate.py.
  """
  _, _, cfg, params, (ids, mask, _), _, full = pair
  model = llama.Llama(cfg)
  variables = {"params": params}
  chunk = 4
  cache = llama.init_cache(cfg, batch_size=3, max_length=SEQ)
  step_fn = jax.jit(lambda c, x, m: model.apply(variables, x, attention_mask=m, cache=c,
                                                decode=True))
  logits = []
  for t in range(0, SEQ, chunk):
    out = step_fn(cache, jnp.asarray(ids[:, t:t + chunk]), jnp.asarray(mask[:, t:t + chunk]))
    logits.append(out.logits)
    cache = out.cache
  assert int(cache.end) == SEQ
  np.testing.assert_array_equal(np.asarray(cache.next_position), mask.sum(-1))
  _assert_close(jnp.concatenate(logits, axis=1), full.logits, mask)


def test_inputs_embeds_equals_input_ids(pair):
  """The multimodal path (embed, splice, call with inputs_embeds) is the same function."""
  _, _, cfg, params, (ids, mask, _), _, a = pair
  model = llama.Llama(cfg)
  variables = {"params": params}
  embeds = model.apply(variables, jnp.asarray(ids), method=llama.Llama.embed)
  assert embeds.shape == (3, SEQ, cfg.hidden_size)
  b = jax.jit(model.apply)(variables, inputs_embeds=embeds, attention_mask=mask)
  np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))


@pytest.mark.parametrize("pair", ["gqa_tied_llama3"], indirect=True)
def test_bf16_compute_fp32_params(pair):
  """bf16 compute with fp32 params: params stay fp32, logits fp32 and close to the fp32 run."""
  _, _, cfg, params, (ids, mask, _), _, ref = pair
  cfg = cfg.copy_and_resolve_references()
  cfg.dtype = "bfloat16"
  out = jax.jit(llama.Llama(cfg).apply)({"params": params}, jnp.asarray(ids), attention_mask=mask)
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  assert out.logits.dtype == jnp.float32 and out.hidden_states.dtype == jnp.bfloat16
  a, b = np.asarray(out.logits)[mask], np.asarray(ref.logits)[mask]
  rel = np.linalg.norm(a - b) / np.linalg.norm(b)
  assert rel < 2e-2, rel


def test_params_carry_logical_axes():
  cfg = _base(scan=True)
  boxed = jax.eval_shape(lambda: llama.Llama(cfg).init(jax.random.key(0),
                                                       jnp.zeros((1, 4), jnp.int32)))
  specs = jax.tree.leaves(
      jax.tree.map(lambda x: x.names, boxed["params"],
                   is_leaf=lambda x: hasattr(x, "names")), is_leaf=lambda x: isinstance(x, tuple))
  assert all(isinstance(s, tuple) for s in specs)
  q = boxed["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.names == ("layers", "embed", "heads", "head_dim")


@pytest.mark.parametrize("field,value,match", [
    ("num_kv_heads", 3, "num_kv_heads"),
    ("head_dim", 15, "head_dim"),
    ("attention_impl", "flash", "attention_impl"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}, "rope_type"),
])
def test_unrepresentable_config_is_rejected(field, value, match):
  cfg = _base()
  cfg[field] = value
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(llama.Llama(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def test_bad_inputs_name_the_argument():
  cfg = _base()
  model = llama.Llama(cfg)
  ids = jnp.zeros((2, 5), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), ids)
  with pytest.raises(ValueError, match="attention_mask"):
    jax.eval_shape(lambda v: model.apply(v, ids, attention_mask=jnp.ones((2, 4), bool)), variables)
  with pytest.raises(ValueError, match="inputs_embeds"):
    jax.eval_shape(lambda v: model.apply(v, inputs_embeds=jnp.zeros((2, 5, cfg.hidden_size + 1))),
                   variables)
  with pytest.raises(ValueError, match="decode"):
    jax.eval_shape(lambda v: model.apply(v, ids, decode=True), variables)


# ----------------------------------------------------------------------------------------------
# The shared attention helper (used by the ViTs and SAM too).


def _reference_attention(q, k, v, mask, bias, scale):
  """Plain numpy softmax(QK^T * scale + bias) V with GQA by repeating kv heads."""
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = np.where(mask, logits, -1e30)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_attention_implementations_agree(impl):
  """GQA with a broadcast [B, 1, T, S] mask and a per-head bias; `auto` is xla on CPU."""
  rs = np.random.RandomState(0)
  q = rs.randn(2, 5, 6, 8).astype(np.float32)
  k, v = rs.randn(2, 7, 2, 8).astype(np.float32), rs.randn(2, 7, 2, 8).astype(np.float32)
  mask = rs.rand(2, 1, 5, 7) > 0.3
  mask[..., 0] = True
  bias = rs.randn(1, 6, 5, 7).astype(np.float32)
  out = attention.dot_product_attention(q, k, v, mask=mask, bias=bias, scale=0.3,
                                        implementation=impl)
  np.testing.assert_allclose(out, _reference_attention(q, k, v, mask, bias, 0.3), atol=1e-5)
  out2d = attention.dot_product_attention(q, k, v, mask=mask[0, 0], implementation=impl)
  np.testing.assert_allclose(out2d, _reference_attention(q, k, v, mask[:1], None, 8 ** -0.5),
                             atol=1e-5)


def test_attention_auto_resolution_and_errors():
  on_gpu = jax.default_backend() == "gpu"
  assert attention.resolve_implementation("auto", jnp.float32, 64) == "xla"
  assert attention.resolve_implementation("auto", jnp.bfloat16, 64) == ("cudnn" if on_gpu
                                                                         else "xla")
  assert attention.resolve_implementation("auto", jnp.bfloat16, 12) == "xla"
  with pytest.raises(ValueError, match="attention_impl"):
    attention.resolve_implementation("flash", jnp.float32, 64)
  with pytest.raises(ValueError, match="multiple"):
    attention.dot_product_attention(jnp.zeros((1, 2, 3, 4)), jnp.zeros((1, 2, 2, 4)),
                                    jnp.zeros((1, 2, 2, 4)))
