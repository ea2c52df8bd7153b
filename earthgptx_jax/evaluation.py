"""Generation-based evaluation of params: answers and masks generated after each example's last
question, scored per task / modality / source (metrics.py), summarised by a headline `score`.

Answers are generated greedily after each example's last question (the reference answer is cut
off); boxes are parsed from the answer text (where the box head, if on, wrote its boxes), masks
decoded from the generated [SEG] tokens and mapped back to the original image exactly as SAM
post-processes (`generate.decode_row`). An unparseable answer or a missing [SEG] scores as
wrong, never as a crash. Caption records of one image (one record per reference caption, as the
converters write them) are scored as one example against all of that image's captions
(`pool_image_references`).

An `Evaluator` holds one `generate.Generator`, so evaluating new params (every few hundred
training steps) reuses its compiled functions; `evaluate_params` keeps one per config.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from data_pipelines import pipeline, schema
from earthgptx_jax import generate, metrics, tasks, template

# Tasks whose records of one image are one example (one record per reference caption).
IMAGE_GROUPED_TASKS = ("image_caption",)


def _last_answer(turns: Sequence[str]) -> str:
  answers = [t for i, t in enumerate(turns) if i % 2 == 1]
  return answers[-1] if answers else ""


def _clean(text: str) -> str:
  """Answers and references are compared without their [SEG] markers."""
  return " ".join(text.replace(template.SEG, " ").split())


def image_group(task: str, source: str, image: bytes) -> str:
  """The group of a record of IMAGE_GROUPED_TASKS ("" for other tasks): its source and image
  content, as records of one image carry the same bytes (stored datasets need no new field)."""
  if task not in IMAGE_GROUPED_TASKS:
    return ""
  return f"{source}:{hashlib.sha256(image).hexdigest()[:20]}"


def pool_image_references(samples: Sequence[metrics.EvalSample], config, split: str | None
                          ) -> list[metrics.EvalSample]:
  """One sample per grouped image (the first generated), scored against every reference of
  that image in the split, as the COCO caption evaluation does.

  The references come from all records of the split, not only the evaluated ones: the stored
  order is shuffled, so a `max_examples` prefix (or a process's shard) holds only some of an
  image's records.
  """
  wanted = {s.group for s in samples if s.group}
  if not wanted:
    return list(samples)
  references: dict[str, list[str]] = {}
  for source in pipeline.eval_sources(config, split or config.data.eval_split).values():
    for index in range(len(source)):
      features = source[index]
      group = image_group(schema.feature_text(features["task"]),
                          schema.feature_text(features["source"]), features["image"])
      if group in wanted:
        turns = [schema.feature_text(t) for t in features["turns"]]
        references.setdefault(group, []).append(_clean(_last_answer(turns)))
  out, seen = [], set()
  for s in samples:
    if s.group and s.group in seen:
      continue
    seen.add(s.group)
    out.append(dataclasses.replace(s, references=tuple(references.get(s.group, s.references)))
               if s.group else s)
  return out


def samples_from_batch(eval_batch, generated: generate.Generated, tokenizer,
                       config) -> list[metrics.EvalSample]:
  """One EvalSample per real row: decoded answer, parsed references, masks in the original
  frame (an all-False mask for each target whose [SEG] was not generated)."""
  out = []
  for i, record in enumerate(eval_batch.records):
    if record is None:
      continue
    height, width = (int(v) for v in eval_batch.batch["image_size"][i])
    target_masks = tuple(schema.decode_mask(m, width, height).astype(bool)
                         for m in record.masks)
    prediction = generate.decode_row(generated, i, eval_batch.batch, tokenizer, config,
                                     max_masks=len(target_masks))
    reference = _last_answer(record.turns)
    target_boxes: tuple = ()
    if record.task == "box_grounding":
      target_boxes = tuple(template.try_parse_boxes(reference, width, height) or ())
    pred_masks = tuple(prediction.masks[q] if q < len(prediction.masks)
                       else np.zeros((height, width), bool) for q in range(len(target_masks)))
    out.append(metrics.EvalSample(
        task=record.task, modality=record.modality, source=record.source,
        answer=_clean(prediction.answer), references=(_clean(reference),),
        image_size=(height, width), target_boxes=target_boxes, pred_masks=pred_masks,
        target_masks=target_masks, group=image_group(record.task, record.source, record.image)))
  return out


def summarize(results: Mapping[str, Any]) -> dict[str, float]:
  """{task/metric: value} over all of each task, plus `score`: the mean over tasks of each
  task's headline metric (tasks.py)."""
  flat, headline = {}, []
  for task, table in results["tasks"].items():
    for name, value in table["all"].items():
      flat[f"{task}/{name}"] = float(value)
    known = tasks.BY_NAME.get(task)  # tasks outside tasks.py have no headline
    if known is not None and known.headline in table["all"]:
      headline.append(float(table["all"][known.headline]))
  flat["score"] = float(np.mean(headline)) if headline else 0.0
  return flat


def task_metrics(with_semantic: bool) -> dict[str, tuple[str, ...]]:
  """The metric families of every task; without SS / S-IoU unless `with_semantic` (they need a
  sentence-embedding model)."""
  return {task: tuple(f for f in families if with_semantic or f != "semantic")
          for task, families in metrics.DEFAULT_TASK_METRICS.items()}


class Evaluator:
  """Generates and scores any params of one config, with one Generator for all of them."""

  def __init__(self, config: ml_collections.ConfigDict, *, mesh=None,
               generator: generate.Generator | None = None):
    self.config = config
    self.generator = generator or generate.Generator(config, mesh=mesh)

  def samples(self, params, data, *, max_examples=None, split=None,
              max_new_tokens=None) -> list[metrics.EvalSample]:
    """The EvalSamples of `params` on `split` (default config.data.eval_split) of `data`."""
    config = self.config
    max_new = int(max_new_tokens or config.get("eval", {}).get("max_new_tokens", 32))
    samples = []
    # On a mesh every process reads the whole split (the same batches): the generator splits
    # each batch's rows over the devices and gathers what they generate, so every process
    # scores every example and all compute the same metrics (process 0 writes them).
    shard = ((0, 1) if self.generator.mesh is not None
             else (jax.process_index(), jax.process_count()))
    for eval_batch in data.eval_iterator(*shard, split=split, max_examples=max_examples):
      prompt_batch, _ = generate.truncate_to_question(eval_batch.batch,
                                                      int(config.model.token_ids.pad))
      generated = self.generator(params, prompt_batch, max_new_tokens=max_new)
      samples += samples_from_batch(eval_batch, generated, data.tokenizer, config)
    return pool_image_references(samples, data.config, split)

  def __call__(self, params, data, *, max_examples=None, split=None,
               with_semantic: bool = False) -> dict[str, float]:
    """Generation-based metrics of `params`, flattened for logging (`summarize`)."""
    samples = self.samples(params, data, max_examples=max_examples, split=split)
    return summarize(metrics.evaluate(samples, task_metrics(with_semantic)))


# The Evaluator of the latest (config, mesh) `evaluate_params` saw: training evaluates with one.
_evaluator: dict[tuple[str, Any], Evaluator] = {}


def evaluator_for(config: ml_collections.ConfigDict, mesh=None) -> Evaluator:
  """The Evaluator of `config` on `mesh`, created on first use and then reused."""
  key = (config.to_json_best_effort(sort_keys=True), mesh)
  if key not in _evaluator:
    _evaluator.clear()
    _evaluator[key] = Evaluator(config, mesh=mesh)
  return _evaluator[key]


def generate_samples(params, config, data, *, mesh=None, max_examples=None, split=None,
                     max_new_tokens=None) -> list[metrics.EvalSample]:
  """The EvalSamples of `params` on the held-out split (`Evaluator.samples`)."""
  return evaluator_for(config, mesh).samples(params, data, max_examples=max_examples,
                                             split=split, max_new_tokens=max_new_tokens)


def evaluate_params(params, config, data, *, mesh=None, max_examples=None, split=None,
                    with_semantic: bool = False) -> dict[str, float]:
  """Generation-based metrics of `params` on the held-out split, flattened for logging."""
  return evaluator_for(config, mesh)(params, data, max_examples=max_examples, split=split,
                                     with_semantic=with_semantic)


def with_data(config: ml_collections.ConfigDict, *, data_dir: str | None = None,
              datasets: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """A copy of `config` reading data_dir and / or exactly `datasets`: one source per dataset,
  keeping the name and weight of a configured source of that dataset (else weight 1)."""
  config = copy.deepcopy(config)
  with config.unlocked():
    if data_dir:
      config.data.data_dir = data_dir
    if datasets:
      configured = {source.dataset: (name, float(source.weight))
                    for name, source in config.data.sources.items()}
      sources = {}
      for dataset in datasets:
        name, weight = configured.get(dataset, (dataset.replace("/", "_"), 1.0))
        sources[name] = ml_collections.ConfigDict(dict(dataset=dataset,
                                                       weight=weight if weight > 0 else 1.0))
      config.data.sources = ml_collections.ConfigDict(sources)
  return config


def format_summary(flat: Mapping[str, float]) -> str:
  """The progress line of an evaluation (`summarize`'s dict): the score, then each task's
  headline metric with its chance level (if the task has one) and example count, in tasks.py
  order, so the task that lags reads at a glance. TensorBoard gets every metric."""
  parts = [f"score {flat.get('score', 0.0):.3f}"]
  for task in tasks.TASKS:
    value = flat.get(f"{task.name}/{task.headline}")
    if value is None:
      continue
    chance = flat.get(f"{task.name}/chance")
    parts.append(f"{task.name} {task.headline} {value:.3f}"
                 + (f" (chance {chance:.2f})" if chance is not None else "")
                 + f" n={int(flat.get(f'{task.name}/n', 0))}")
  return " | ".join(parts)
