"""Jitted KV-cached generation: same ids as HF `generate`, padding either side, embeds prefill."""

import numpy as np
import pytest
import torch
import transformers

import jax
import jax.numpy as jnp
from configs import fusion
from earthgptx_jax.convert import llama as convert
from earthgptx_jax.models import decoding, llama

PROMPT_LENS = (7, 3, 9)
L = max(PROMPT_LENS)
NEW = 12
PAD, BOS = 0, 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(vocab_size=89, hidden_size=32, intermediate_size=56,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, pad_token_id=PAD,
                                    bos_token_id=BOS, eos_token_id=None)
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  folder = tmp_path_factory.mktemp("gen")
  hf.save_pretrained(folder)
  cfg, params = convert.load_hf_llama(folder, fusion.get_config("tiny").model.llm)
  rs = np.random.RandomState(0)
  prompts = [np.concatenate([[BOS], rs.randint(3, 89, n - 1)]) for n in PROMPT_LENS]
  left = np.full((3, L), PAD)
  right = np.full((3, L), PAD)
  for b, p in enumerate(prompts):
    left[b, L - len(p):] = p
    right[b, :len(p)] = p
  left_mask = np.arange(L)[None] >= (L - np.array(PROMPT_LENS))[:, None]
  right_mask = np.arange(L)[None] < np.array(PROMPT_LENS)[:, None]

  def hf_generate(eos):
    with torch.no_grad():
      out = hf.generate(torch.tensor(left), attention_mask=torch.tensor(left_mask.astype(int)),
                        max_new_tokens=NEW, do_sample=False, pad_token_id=PAD, eos_token_id=eos)
    return out[:, L:].numpy()

  # An EOS that row 0 emits mid-way, so stopping and padding after EOS are exercised.
  eos = int(hf_generate(None)[0, 4])
  return dict(model=llama.Llama(cfg), variables={"params": params}, cfg=cfg, eos=eos,
              left=left, left_mask=left_mask, right=right, right_mask=right_mask,
              ref=hf_generate(eos))


def _gen(s, **kw):
  kw.setdefault("input_ids", jnp.asarray(s["left"]))
  kw.setdefault("attention_mask", s["left_mask"])
  return decoding.generate(s["model"], s["variables"], max_new_tokens=NEW, eos_id=s["eos"],
                           pad_id=PAD, return_hidden_states=True, **kw)


@pytest.fixture(scope="module")
def greedy(setup):
  return _gen(setup)


def test_greedy_matches_hf_generate(setup, greedy):
  ref = setup["ref"]
  ours = np.asarray(greedy.tokens)
  assert ours.shape == (3, NEW)
  np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)
  assert np.all(ours[:, ref.shape[1]:] == PAD)  # HF stops once every row is done
  eos_at = np.argmax(ours == setup["eos"], axis=1)
  assert ours[0, 4] == setup["eos"] and np.all(ours[0, 5:] == PAD)
  want = np.where((ours == setup["eos"]).any(1), eos_at + 1, NEW)
  np.testing.assert_array_equal(np.asarray(greedy.lengths), want)


def test_right_padding_equals_left_padding(setup, greedy):
  """Same prompts padded on the right decode to the same ids, with one compilation."""
  before = decoding._generate._cache_size()
  out = _gen(setup, input_ids=jnp.asarray(setup["right"]), attention_mask=setup["right_mask"])
  assert decoding._generate._cache_size() == before  # same shapes: no retrace
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy.tokens))
  np.testing.assert_allclose(out.hidden_states, greedy.hidden_states, atol=1e-5)


def test_inputs_embeds_prefill(setup, greedy):
  """The multimodal path: prefill from embeddings, continue from token ids."""
  embeds = setup["model"].apply(setup["variables"], jnp.asarray(setup["left"]),
                                method=llama.Llama.embed)
  out = decoding.generate(setup["model"], setup["variables"]["params"], inputs_embeds=embeds,
                         attention_mask=setup["left_mask"], max_new_tokens=NEW,
                         eos_id=setup["eos"], pad_id=PAD, return_hidden_states=True)  # bare tree
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy.tokens))


def test_hidden_states_are_the_predicting_positions(setup, greedy):
  """hidden_states[:, i] = full-forward hidden state at the position whose logits chose token i."""
  tokens = np.asarray(greedy.tokens)
  lengths = np.asarray(greedy.lengths)
  seq = np.concatenate([setup["left"], tokens], axis=1)
  mask = np.concatenate([setup["left_mask"], np.ones_like(tokens, bool)], axis=1)
  full = jax.jit(setup["model"].apply)(setup["variables"], jnp.asarray(seq), attention_mask=mask)
  hidden = np.asarray(greedy.hidden_states)
  for b in range(3):
    n = lengths[b]
    np.testing.assert_allclose(hidden[b, :n], np.asarray(full.hidden_states)[b, L - 1:L - 1 + n],
                               atol=1e-5)
    assert np.all(hidden[b, n:] == 0)


def test_sampling(setup, greedy):
  """Seeded sampling is reproducible; nucleus top_p -> 0 keeps only the argmax (= greedy)."""
  a = _gen(setup, rng=jax.random.key(1), temperature=1.0)
  b = _gen(setup, rng=jax.random.key(1), temperature=1.0)
  c = _gen(setup, rng=jax.random.key(2), temperature=1.0)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
  assert np.all((np.asarray(a.tokens) >= 0) & (np.asarray(a.tokens) < setup["cfg"].vocab_size))
  before = decoding._generate._cache_size()
  nucleus = _gen(setup, rng=jax.random.key(3), temperature=0.5, top_p=1e-6)
  assert decoding._generate._cache_size() == before  # temperature / top_p are traced
  np.testing.assert_array_equal(np.asarray(nucleus.tokens), np.asarray(greedy.tokens))


def test_top_p_filter_keeps_smallest_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  draws = jax.jit(jax.vmap(lambda k: decoding._select(logits, k, True, 1.0, 0.75)))(
      jax.random.split(jax.random.key(0), 400))
  assert set(np.unique(np.asarray(draws))) == {0, 1}  # 0.5 + 0.3 >= 0.75; 0.15 is cut


def test_bad_arguments(setup):
  with pytest.raises(ValueError, match="attention_mask"):
    _gen(setup, attention_mask=setup["left_mask"][:, 1:])
  with pytest.raises(ValueError, match="exactly one"):
    _gen(setup, inputs_embeds=jnp.zeros((3, L, 32)))
  with pytest.raises(ValueError, match="rng"):
    _gen(setup, temperature=0.7)
  with pytest.raises(ValueError, match="top_p"):
    _gen(setup, top_p=0.0, rng=jax.random.key(0), temperature=1.0)
