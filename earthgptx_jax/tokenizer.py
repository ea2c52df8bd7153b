"""Tokenizers: load any local HF tokenizer folder with the project's special tokens, train a
small one for the tiny preset and tests (no hub here), complete a config from one (vocabulary
size, special-token ids), and grow embeddings to match.

The special tokens and their order come from `template.SPECIAL_TOKENS` only; rows for added
tokens are appended in that order, so token ids and resized embeddings are deterministic.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
from collections.abc import Iterable, Mapping

import ml_collections
import numpy as np

from earthgptx_jax import template

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
# Ids 0..3 of a tokenizer built here (LLaMA's order, with <pad> at 3 instead of absent).
BASE_SPECIAL_TOKENS = (UNK, BOS, EOS, template.PAD)
# `template.SPECIAL_TOKENS` by the names of their ids in the config (model.token_ids), in order.
TOKEN_NAMES = {"image_start": template.IMAGE_START, "image_end": template.IMAGE_END,
               "image_patch": template.IMAGE_PATCH, "vp_start": template.VP_START,
               "vp_end": template.VP_END, "vp_patch": template.VP_PATCH, "seg": template.SEG,
               "box": template.BOX}


def load_tokenizer(folder: str | os.PathLike):
  """A local HF tokenizer folder with `template.SPECIAL_TOKENS` added (missing ones, in order).

  A tokenizer without a pad token gets its unk token as pad (as LLaVA / LISA do for LLaMA),
  else `template.PAD` appended. Never reaches the network.
  """
  import transformers  # heavy (seconds): imported by the runs that load a tokenizer only
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"tokenizer folder: {folder} does not exist")
  try:
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
  except (OSError, ValueError) as e:
    raise ValueError(f"tokenizer folder {folder}: not a transformers tokenizer ({e})") from None
  vocab = tok.get_vocab()
  missing = [t for t in template.SPECIAL_TOKENS if t not in vocab]
  if missing:
    tok.add_tokens(missing, special_tokens=True)
  if tok.pad_token is None:
    if tok.unk_token is not None:
      tok.pad_token = tok.unk_token
    else:
      tok.add_special_tokens({"pad_token": template.PAD})
  for t in template.SPECIAL_TOKENS:  # each must encode to exactly one id
    ids = tok.encode(t, add_special_tokens=False)
    if len(ids) != 1:
      raise ValueError(f"tokenizer {folder}: special token {t!r} encodes to {ids}, not one id")
  return tok


def special_token_ids(tokenizer) -> dict[str, int]:
  """The ids the model's config holds as `model.token_ids`: bos, eos, pad (eos when the
  tokenizer has none), then `TOKEN_NAMES` (template.SPECIAL_TOKENS by name).

  Raises ValueError naming a special token the tokenizer lacks (load it with `load_tokenizer`).
  """
  ids = {}
  for name in ("bos", "eos"):
    value = getattr(tokenizer, f"{name}_token_id")
    if value is None:
      raise ValueError(f"tokenizer: has no {name} token")
    ids[name] = int(value)
  pad = tokenizer.pad_token_id
  ids["pad"] = int(ids["eos"] if pad is None else pad)
  unk = getattr(tokenizer, "unk_token_id", None)
  for name, token in TOKEN_NAMES.items():
    value = tokenizer.convert_tokens_to_ids(token)
    if value is None or value == unk:
      raise ValueError(f"tokenizer: special token {token!r} ({name}) is missing; load it "
                       "with earthgptx_jax.tokenizer, which adds template.SPECIAL_TOKENS")
    ids[name] = int(value)
  return ids


def complete_config(config: ml_collections.ConfigDict, tokenizer) -> ml_collections.ConfigDict:
  """A new config that fits `tokenizer`: model.llm.vocab_size grown to len(tokenizer) if it is
  smaller, and model.token_ids set to `special_token_ids`. The trainer saves both with the
  run, so inference reads them back without the tokenizer's help."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.model.llm.vocab_size = max(int(config.model.llm.vocab_size), len(tokenizer))
    if "token_ids" not in config.model:
      config.model.token_ids = ml_collections.ConfigDict()
    for name, value in special_token_ids(tokenizer).items():
      config.model.token_ids[name] = value
  return config


def build_tokenizer(texts: Iterable[str], vocab_size: int, folder: str | os.PathLike):
  """Trains a byte-level BPE on `texts` and saves it as an HF folder; returns `load_tokenizer`.

  Ids 0..3 are <unk> <s> </s> <pad>, then `template.SPECIAL_TOKENS` in order, then the 256
  byte symbols and merges up to `vocab_size` in total. Byte-level, so any text encodes (no
  unk) and decodes back exactly. `<s>` is prepended to every encoded sequence, as LLaMA does.
  """
  # Heavy (seconds): imported by the runs that train a tokenizer only.
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  import transformers  # as above

  specials = [*BASE_SPECIAL_TOKENS, *template.SPECIAL_TOKENS]
  floor = len(specials) + len(pre_tokenizers.ByteLevel.alphabet())
  if vocab_size < floor:
    raise ValueError(f"vocab_size: {vocab_size} is below the {floor} special + byte tokens")
  tok = Tokenizer(models.BPE(unk_token=UNK))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  bos_id = tok.token_to_id(BOS)
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=template.PAD,
      extra_special_tokens=list(template.SPECIAL_TOKENS))
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  fast.save_pretrained(str(folder))
  return load_tokenizer(folder)


def resize_embeddings(params: Mapping, new_vocab: int) -> dict:
  """Grows `embed_tokens/embedding` [V, D] (and untied `lm_head/kernel` [D, V]) to `new_vocab`.

  New rows are the mean of the old rows (LLaVA / LISA's recipe): deterministic, and the new
  tokens start with the average logit instead of a random one. Old rows are kept exactly.
  Accepts the Llama params tree (or `{"params": tree}`); returns the same structure with
  numpy leaves for the resized tensors. The caller sets `model.llm.vocab_size = new_vocab`.
  """
  from flax import linen as nn  # keeps flax / jax out of the data pipeline's imports
  params = nn.meta.unbox(params)
  wrapped = "params" in params and "embed_tokens" not in params
  tree = dict(params["params"] if wrapped else params)
  if "embed_tokens" not in tree:
    raise ValueError("resize_embeddings: params have no 'embed_tokens' (not Llama params)")
  emb = np.asarray(tree["embed_tokens"]["embedding"])
  old = emb.shape[0]
  if new_vocab < old:
    raise ValueError(f"resize_embeddings: new_vocab={new_vocab} is smaller than the current "
                     f"vocabulary {old}; shrinking would drop trained rows")

  def grow(x: np.ndarray, axis: int) -> np.ndarray:
    mean = x.astype(np.float64).mean(axis=axis, keepdims=True).astype(x.dtype)
    reps = [1] * x.ndim
    reps[axis] = new_vocab - old
    return np.concatenate([x, np.tile(mean, reps)], axis=axis)

  tree["embed_tokens"] = {**tree["embed_tokens"], "embedding": grow(emb, 0)}
  if "lm_head" in tree:
    kernel = np.asarray(tree["lm_head"]["kernel"])
    tree["lm_head"] = {**tree["lm_head"], "kernel": grow(kernel, kernel.ndim - 1)}
  return {"params": tree} if wrapped else tree


# tokenizer_config.json classes that are the `tokenizers` backend alone, with nothing added by a
# transformers subclass (a LlamaTokenizer etc. is loaded by transformers, as written).
_PLAIN_BACKENDS = ("TokenizersBackend", "PreTrainedTokenizerFast")


class SavedTokenizer:
  """A saved tokenizer folder read with the `tokenizers` library alone: what answering a request
  calls (encode, decode, the special ids) and nothing else. transformers is not imported: it
  imports torch, seconds of an `infer` call that needs neither."""

  def __init__(self, backend, special: Mapping[str, str]):
    self._backend = backend
    for name in ("bos", "eos", "unk", "pad"):
      setattr(self, f"{name}_token", special.get(name))
      setattr(self, f"{name}_token_id", backend.token_to_id(special[name])
              if special.get(name) else None)

  def __len__(self) -> int:
    return self._backend.get_vocab_size(with_added_tokens=True)

  def get_vocab(self) -> dict[str, int]:
    return self._backend.get_vocab(with_added_tokens=True)

  def convert_tokens_to_ids(self, token: str) -> int | None:
    value = self._backend.token_to_id(token)
    return self.unk_token_id if value is None else value

  def encode(self, text: str, add_special_tokens: bool = True,
             split_special_tokens: bool = False) -> list[int]:
    # As transformers' backend does: a flag of the (shared) backend set for each call.
    self._backend.encode_special_tokens = split_special_tokens
    return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def load_saved_tokenizer(folder: str | os.PathLike):
  """The tokenizer a training run saved (workdir/tokenizer): a `SavedTokenizer` when the folder
  is a plain `tokenizers` backend already holding every special token, which encodes and
  decodes exactly as `load_tokenizer`'s; else `load_tokenizer(folder)`."""
  from tokenizers import Tokenizer  # light (tens of ms); this module's other users need none
  folder = pathlib.Path(folder)
  try:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
  except Exception:  # noqa: BLE001 — unreadable: load_tokenizer reports it, below
    return load_tokenizer(folder)
  special = {name: config.get(f"{name}_token") for name in ("bos", "eos", "unk", "pad")}
  special = {k: v.get("content") if isinstance(v, dict) else v for k, v in special.items()}
  vocab = backend.get_vocab(with_added_tokens=True)
  if (config.get("tokenizer_class") not in _PLAIN_BACKENDS or not special["pad"]
      or any(t not in vocab for t in (*template.SPECIAL_TOKENS, *filter(None, special.values())))):
    return load_tokenizer(folder)
  return SavedTokenizer(backend, special)
