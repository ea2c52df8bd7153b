"""Evaluation metrics for every EarthGPT-X task, and per task / modality / source tables.

Pure numpy / python, independent of the model: everything here scores answer *text* (and
decoded masks) against references, so the same numbers come out of a JAX run, a PyTorch export
or a predictions file. Each metric follows the definition its benchmark community reports:
short answers (accuracy, VQA, Osprey's SS / S-IoU) in answer_metrics.py, captions
(pycocoevalcap) in caption_metrics.py, boxes and masks (Acc@0.5, LISA's gIoU / cIoU / mIoU) in
region_metrics.py. Which families score a task is in tasks.py; classification rows carry
`chance`, 1 / the number of distinct (normalised) labels among the group's references.

`evaluate(samples)` groups `EvalSample`s by task and computes each task's metric families on
the whole task, per modality and per source (corpus-level metrics such as CIDEr and cIoU are
recomputed on each group, as if that group were evaluated alone). Samples of one image (same
`EvalSample.group`) are one example, as in the COCO caption evaluation: the first one's answer
is scored against the references of all of them. `write_json` and `format_table` present the
result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from earthgptx_jax import answer_metrics, caption_metrics, region_metrics, tasks


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
  target_boxes: tuple[region_metrics.Box, ...] = ()
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
  """Exact-match accuracy against the accepted labels."""

  def per_sample(self, samples):
    return [answer_metrics.exact_match(
        s.answer, answer_metrics.reference_tuple(s.references, "references")) for s in samples]

  def reduce(self, stats):
    return {"accuracy": float(np.mean(stats))}


class _DistinctLabelChance(_Family):
  """Chance: 1 / the number of distinct (normalised) labels in the group."""

  def per_sample(self, samples):
    return [answer_metrics.normalize_answer(
        answer_metrics.reference_tuple(s.references, "references")[0]) for s in samples]

  def reduce(self, stats):
    return {"chance": 1.0 / len(set(stats))}


class _VQA(_Family):

  def per_sample(self, samples):
    return [answer_metrics.vqa_accuracy(s.answer, s.references) for s in samples]

  def reduce(self, stats):
    return {"vqa_accuracy": float(np.mean(stats))}


class _Semantic(_Family):

  def __init__(self, embed_fn: answer_metrics.EmbedFn | None):
    self.embed_fn = embed_fn

  def per_sample(self, samples):
    labels = [answer_metrics.reference_tuple(s.references, "references")[0] for s in samples]
    ss = answer_metrics.semantic_similarity([s.answer for s in samples], labels, self.embed_fn)
    return [(float(v), answer_metrics.semantic_iou(s.answer, l))
            for v, s, l in zip(ss, samples, labels)]

  def reduce(self, stats):
    ss, siou = np.mean(np.asarray(stats), axis=0)
    return {"SS": float(ss), "S-IoU": float(siou)}


class _Caption(_Family):

  def __init__(self, scorer: caption_metrics.CaptionScorer):
    self.scorer = scorer

  def per_sample(self, samples):
    tokenized = self.scorer.tokenize(
        [[s.answer, *answer_metrics.reference_tuple(s.references, "references")]
         for s in samples])
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
      out.append(region_metrics.grounding_scores(s.answer, s.target_boxes, s.image_size))
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
      out.append(np.stack([region_metrics.mask_intersection_union(p, t)
                           for p, t in zip(s.pred_masks, s.target_masks)]))
    return out

  def reduce(self, stats):
    return region_metrics.mask_scores_from_counts(np.concatenate(stats))


METRIC_FAMILIES = ("accuracy", "vqa", "semantic", "caption", "box", "mask", "distinct_labels")

# Task name -> metric families (its chance family last), for every task of tasks.py; pass your
# own mapping to `evaluate` for other task names.
DEFAULT_TASK_METRICS: dict[str, tuple[str, ...]] = {
    t.name: (*t.metrics, *([t.chance] if t.chance else [])) for t in tasks.TASKS}


def evaluate(samples: Sequence[EvalSample],
             task_metrics: Mapping[str, Sequence[str]] | None = None,
             embed_fn: answer_metrics.EmbedFn | None = None,
             caption_scorer: caption_metrics.CaptionScorer | None = None) -> dict[str, Any]:
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
    scorer = caption_scorer or stack.enter_context(caption_metrics.CaptionScorer())
    builders = {"accuracy": _Accuracy, "vqa": _VQA, "semantic": lambda: _Semantic(embed_fn),
                "caption": lambda: _Caption(scorer), "box": _Box, "mask": _Mask,
                "distinct_labels": _DistinctLabelChance}
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

