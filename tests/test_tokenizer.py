"""Tokenizers: local BPE for the tiny preset, special tokens in order, deterministic resize."""

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

import flax.linen as nn
import jax
import jax.numpy as jnp
from configs import fusion
from earthgptx_jax import template
from earthgptx_jax import tokenizer as tk
from earthgptx_jax.models import llama

CORPUS = [
    f"{template.SYSTEM_PROMPT} {template.USER_ROLE}: {template.IMAGE_PLACEHOLDER} "
    f"{template.modality_preamble(m)} Where is the {obj}? {template.ASSISTANT_ROLE}: "
    f"{template.format_box((10 * i, 20, 200 + i, 90), 800, 600)} {template.SEG}"
    for i, (m, obj) in enumerate([(m, o) for m in template.MODALITIES
                                  for o in ("ship", "vehicle", "small target", "airplane")])
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tok")
  vocab = fusion.get_config("tiny").model.llm.vocab_size
  return tk.build_tokenizer(CORPUS, vocab, folder), folder, vocab


def test_built_tokenizer_layout(built):
  tok, _, vocab = built
  assert len(tok) <= vocab
  assert [tok.convert_tokens_to_ids(t) for t in tk.BASE_SPECIAL_TOKENS] == [0, 1, 2, 3]
  ids = tk.special_token_ids(tok)
  assert [ids[n] for n in tk.TOKEN_NAMES] == list(range(4, 4 + len(template.SPECIAL_TOKENS)))
  assert (ids["bos"], ids["eos"], ids["pad"]) == (1, 2, 3)


def test_special_tokens_are_atomic_and_text_round_trips(built):
  tok, _, _ = built
  patches = template.IMAGE_PATCH * 3
  text = f"{template.IMAGE_START}{patches}{template.IMAGE_END} a ship at [12,340,56,999] {template.SEG}"
  ids = tok(text).input_ids
  assert ids[0] == tok.bos_token_id
  sp = tk.special_token_ids(tok)
  assert ids[1:6] == [sp["image_start"]] + [sp["image_patch"]] * 3 + [sp["image_end"]]
  assert ids.count(sp["seg"]) == 1
  # Byte-level: unseen characters encode without <unk> and decode exactly.
  odd = "Ünïcödé 合成孔径雷达 \t tabs\nnewline [0,0]"
  odd_ids = tok(odd, add_special_tokens=False).input_ids
  assert tok.unk_token_id not in odd_ids
  assert tok.decode(odd_ids) == odd


def test_saved_folder_reloads_identically(built):
  tok, folder, _ = built
  again = tk.load_tokenizer(folder)
  assert len(again) == len(tok)
  assert again(CORPUS[3]).input_ids == tok(CORPUS[3]).input_ids


def test_load_adds_missing_special_tokens_in_order(tmp_path):
  """A base tokenizer without our tokens gets them appended, in template order, pad = unk."""
  words = ["<unk>", "hello", "world", "ship"]
  base = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  base.pre_tokenizer = pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=base, unk_token="<unk>").save_pretrained(
      tmp_path)
  tok = tk.load_tokenizer(tmp_path)
  ids = [tok.convert_tokens_to_ids(t) for t in template.SPECIAL_TOKENS]
  assert ids == list(range(len(words), len(words) + len(template.SPECIAL_TOKENS)))
  assert tok.pad_token == "<unk>"
  assert tok(f"hello {template.SEG} ship", add_special_tokens=False).input_ids == [
      1, ids[template.SPECIAL_TOKENS.index(template.SEG)], 3]


def test_complete_config_sets_vocab_size_and_token_ids_in_a_new_config(built):
  tok, _, vocab = built
  config = fusion.get_config("tiny")
  config.model.llm.vocab_size = len(tok) - 5  # a preset smaller than the tokenizer grows
  done = tk.complete_config(config, tok)
  assert done is not config and config.model.token_ids.seg is None
  assert done.model.llm.vocab_size == len(tok)
  for name, token in tk.TOKEN_NAMES.items():
    assert done.model.token_ids[name] == tok.convert_tokens_to_ids(token)
  assert (done.model.token_ids.bos, done.model.token_ids.eos, done.model.token_ids.pad) == (1, 2, 3)
  config.model.llm.vocab_size = vocab + 100  # never shrunk
  assert tk.complete_config(config, tok).model.llm.vocab_size == vocab + 100
  assert tuple(tk.TOKEN_NAMES.values()) == template.SPECIAL_TOKENS


def test_special_token_ids_name_a_missing_token(tmp_path):
  words = ["<unk>", "<s>", "</s>", "ship"]
  base = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  plain = transformers.PreTrainedTokenizerFast(tokenizer_object=base, unk_token="<unk>",
                                               bos_token="<s>", eos_token="</s>")
  with pytest.raises(ValueError, match=r"special token '<img>' \(image_start\) is missing"):
    tk.special_token_ids(plain)


def test_load_rejects_non_tokenizer_folders(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tk.load_tokenizer(tmp_path / "absent")
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(ValueError, match="not a transformers tokenizer"):
    tk.load_tokenizer(tmp_path)


@pytest.mark.parametrize("tied", [False, True])
def test_resize_embeddings_mean_rows(tied):
  cfg = fusion.get_config("tiny").model.llm
  cfg.tie_word_embeddings = tied
  cfg.num_layers = 1
  ids = jnp.zeros((1, 3), jnp.int32)
  params = jax.jit(llama.Llama(cfg).init)(jax.random.key(0), ids)["params"]
  params = jax.tree.map(np.asarray, nn.meta.unbox(params))
  new_vocab = cfg.vocab_size + len(template.SPECIAL_TOKENS)
  resized = tk.resize_embeddings({"params": params}, new_vocab)
  again = tk.resize_embeddings({"params": params}, new_vocab)
  emb = resized["params"]["embed_tokens"]["embedding"]
  old = params["embed_tokens"]["embedding"]
  assert emb.shape == (new_vocab, cfg.hidden_size)
  np.testing.assert_array_equal(emb[:cfg.vocab_size], old)
  added = len(template.SPECIAL_TOKENS)
  np.testing.assert_allclose(emb[cfg.vocab_size:],
                             np.broadcast_to(old.mean(0), (added, old.shape[1])), atol=1e-8)
  np.testing.assert_array_equal(emb, again["params"]["embed_tokens"]["embedding"])
  assert ("lm_head" in resized["params"]) == (not tied)
  if not tied:
    head = resized["params"]["lm_head"]["kernel"]
    assert head.shape == (cfg.hidden_size, new_vocab)
    np.testing.assert_allclose(head[:, -1], params["lm_head"]["kernel"].mean(1), atol=1e-8)
  with pytest.raises(ValueError, match="smaller"):
    tk.resize_embeddings(params, 10)
  if tied:
    return
  # The model runs with the grown vocabulary and new tokens get the same (mean) logit.
  cfg.vocab_size = new_vocab
  out = jax.jit(llama.Llama(cfg).apply)(resized, jnp.asarray([[new_vocab - 1, 5, new_vocab - 2]]))
  assert out.logits.shape == (1, 3, new_vocab)
  np.testing.assert_allclose(out.logits[..., -1], out.logits[..., -2], rtol=1e-6)
