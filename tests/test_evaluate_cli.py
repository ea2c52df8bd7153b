"""`python -m earthgptx_jax.evaluate` on a workdir: another split, a real dataset built with
`data_pipelines.build` (--data_dir / --datasets), caption references pooled per image, and the
headline score.

The workdir holds random tiny weights written as train.py writes them (config.json,
tokenizer/, an Orbax checkpoint), so no training is compiled here; the scores are those of an
untrained model, only the plumbing is asserted.
"""

import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from data_pipelines import builders, pipeline, schema
from data_pipelines.converters import captions
from earthgptx_jax import checkpointing, evaluation, metrics
from model_fixtures import random_workdir

ROOT = pathlib.Path(__file__).resolve().parents[1]
RSICD = "RSICD_captions_sample"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny workdir whose config reads a small synthetic_rs (train 6, validation 3 per sensor):
  .path, and the .config and .tokenizer written there."""
  texts = ["what is in the region? a ship near the plane", "segment the storage tank",
           "many green trees are in a dense residential area near a road"] * 20

  def small_synthetic(config):
    config.data.synthetic.num_train = 6
    config.data.synthetic.num_eval = 3
    builders.ensure_synthetic(config.data.data_dir, config)

  wd, config, tokenizer = random_workdir(tmp_path_factory.mktemp("evaluate"), texts,
                                         small_synthetic)
  return types.SimpleNamespace(path=wd, config=config, tokenizer=tokenizer)


def _run(cwd, module, *args):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=900)


def _error_lines(result):
  return [l for l in result.stderr.splitlines() if l.startswith("error:")]


def test_eval_iterator_reads_the_given_split(workdir):
  data = pipeline.Data(config=workdir.config, tokenizer=workdir.tokenizer)
  ids = [r.id for b in data.eval_iterator(split="train", max_examples=5) for r in b.records
         if r is not None]
  assert len(ids) == 5 and all("-train-" in i for i in ids), ids
  ids = [r.id for b in data.eval_iterator(max_examples=2) for r in b.records if r is not None]
  assert ids and all("-validation-" in i for i in ids), ids  # default: data.eval_split


@pytest.mark.slow  # ~2 min; the split itself is checked above without a model
def test_cli_evaluates_another_split_of_the_configured_data(tmp_path, workdir):
  result = _run(tmp_path, "earthgptx_jax.evaluate", f"--workdir={workdir.path}", "--split=train",
                "--max_examples=4", "--out=m.json", "--nosemantic")
  assert result.returncode == 0, result.stderr[-3000:]
  tasks = json.loads((tmp_path / "m.json").read_text())["tasks"]
  assert 1 <= sum(t["all"]["n"] for t in tasks.values()) <= 4
  # A split the data does not have: one line naming it, before any generation.
  result = _run(tmp_path, "earthgptx_jax.evaluate", f"--workdir={workdir.path}", "--split=test",
                "--out=other.json")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert len(_error_lines(result)) == 1 and "'test'" in _error_lines(result)[0], result.stderr
  assert not (tmp_path / "other.json").exists()


def test_cli_evaluates_a_workdir_on_a_built_real_dataset(tmp_path, workdir, shared_data):
  """The README's recipe as a user types it: build RSICD with data_pipelines.build, then
  evaluate the workdir on it, relative paths from the current directory."""
  (tmp_path / "run").symlink_to(workdir.path)  # the trained workdir, named relatively
  built = _run(tmp_path, "data_pipelines.build", "--dataset=rsicd",
               f"--manual_dir={shared_data / RSICD}", "--data_dir=data")
  assert built.returncode == 0, built.stderr[-3000:]
  assert "rsicd test: 500 records" in built.stdout
  result = _run(tmp_path, "earthgptx_jax.evaluate", "--workdir=run", "--split=test",
                "--data_dir=data", "--datasets=rsicd", "--max_examples=8", "--out=m.json")
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((tmp_path / "m.json").read_text())
  assert list(results["tasks"]) == ["image_caption"]
  caption = results["tasks"]["image_caption"]
  assert list(caption["by_source"]) == ["rsicd"]
  assert 1 <= caption["all"]["n"] <= 8  # images: records of one image are one example
  assert "score" in results["summary"] and "task: image_caption" in result.stdout

  for bad, needle in [("--datasets=rsicd,nope", "--datasets"),
                      ("--datasets=sirst", "sirst")]:  # known but not built under data/
    result = _run(tmp_path, "earthgptx_jax.evaluate", "--workdir=run", "--split=test",
                  "--data_dir=data", bad, "--out=bad.json")
    assert result.returncode == 2 and len(_error_lines(result)) == 1, result.stderr[-2000:]
    assert needle in _error_lines(result)[0]
  assert not (tmp_path / "bad.json").exists()


def test_pooled_references_are_every_caption_of_the_image(tmp_path, workdir, shared_data):
  """A prefix of the (shuffled) stored records holds only some captions of an image: each
  kept sample is scored against all of them, once per image."""
  builders.build("rsicd", str(tmp_path), manual_dir=str(shared_data / RSICD))
  config = evaluation.with_data(workdir.config, data_dir=str(tmp_path),
                                datasets=("rsicd",))
  assert [(s.dataset, s.weight) for s in config.data.sources.values()] == [("rsicd", 1.0)]
  source = pipeline.eval_sources(config, "test")["rsicd"]
  records = [schema.from_features(source[i]) for i in range(40)]  # some images repeat
  samples = [metrics.EvalSample(r.task, r.modality, r.source, "a plane", (r.turns[-1],),
                                group=evaluation.image_group(r.task, r.source, r.image))
             for r in records]
  pooled = evaluation.pool_image_references(samples, config, "test")
  stems = [r.id.rsplit("-", 1)[0].removeprefix("rsicd-") for r in records]
  assert len(pooled) == len(set(stems)) < len(samples)
  truth = json.loads((shared_data / RSICD / "src/datasets/RSICD/dataset/test.json").read_text())
  by_stem = {os.path.splitext(name)[0]: [c for c in map(captions.clean, caps) if c]
             for name, caps in truth.items()}
  first = {}
  for stem, sample in zip(stems, samples):
    first.setdefault(stem, sample)
  for stem, sample in zip(dict.fromkeys(stems), pooled):
    assert sample.answer == first[stem].answer
    assert sorted(sample.references) == sorted(by_stem[stem])


def test_evaluating_new_params_traces_nothing_again(workdir):
  """Training evaluates new params every few hundred steps: the second evaluation of one config
  reuses the jitted prefill, decoding and heads (a Generator made afresh per evaluation traced
  and compiled them all again)."""
  data = pipeline.Data(config=workdir.config, tokenizer=workdir.tokenizer)
  _, params = checkpointing.load_params(workdir.path, workdir.config)
  first_params, later_params = (jax.tree.map(lambda x, s=s: x * s, params) for s in (1.0, 1.01))
  traces = []

  def listener(event, duration_secs, **kwargs):
    del duration_secs, kwargs
    if event == "/jax/core/compile/jaxpr_trace_duration":
      traces.append(event)

  evaluation.evaluate_params(first_params, workdir.config, data, max_examples=2)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    flat = evaluation.evaluate_params(later_params, workdir.config, data, max_examples=2)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert "score" in flat
  assert not traces


def _mask(h, w, box=None):
  m = np.zeros([h, w], bool)
  if box:
    m[box[1]:box[3], box[0]:box[2]] = True
  return m


def test_summary_counts_segmentation_by_giou():
  """A model that segments nothing has gIoU 0 while mIoU (background included) reads ~0.5:
  the headline must be gIoU, as LISA reports."""
  target = _mask(32, 32, (4, 4, 12, 12))
  seg = [metrics.EvalSample("referring_segmentation", "sar", "s", "[SEG]",
                            pred_masks=(_mask(32, 32),), target_masks=(target,))] * 3
  cls = [metrics.EvalSample("scene_classification", "sar", "s", a, (r,))
         for a, r in [("forest", "forest"), ("water", "forest")]]
  results = metrics.evaluate(seg + cls)
  row = results["tasks"]["referring_segmentation"]["all"]
  assert row["gIoU"] == 0.0 and row["mIoU"] > 0.45
  flat = evaluation.summarize(results)
  assert flat["score"] == pytest.approx((0.0 + 0.5) / 2)
  assert results["tasks"]["scene_classification"]["all"]["chance"] == 1.0  # one label
