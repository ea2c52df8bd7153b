"""The README's main job end to end: train the tiny preset on synthetic_rs, then score it.

Thresholds sit about half of what this command measured (1000 steps, the first 300 of them the
alignment stage; all 300 held-out examples; 2 CPU cores; with the box head): image_caption
CIDEr 2.03, region_caption CIDEr 1.47, VQA accuracy 0.59, referring-segmentation gIoU 0.146, scene
classification 0.44 (chance 0.25, asserted at 0.33), score 0.66. An untrained model scores ~0 on
each. In that mixed budget referring classification (0.17 on 30 examples, chance 0.20), relation
(0.0) and box Acc@0.5 (0.02) stay near chance; they are reported in metrics.json, not asserted
there. Referring
classification has its own run below: trained on it alone for 600 steps, the tiny model names the
prompted object on 0.54 of 95 held-out examples (asserted at 0.35; without the region features,
`model.prompt.region.sources=()`, the same run gives 0.20 (19 of 95, the class prior)). Box
grounding has its own run too: trained on it alone for 600 steps, the box head finds the named
object at Acc@0.5 0.287 on 115 held-out examples (asserted at 0.15), where boxes spelled out as
text tokens stayed at 0.0.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _train_tiny(tmp_path, *overrides: str) -> dict:
  """The README's main command (one CPU device, as a user runs it) with `overrides`; its
  metrics.json."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  workdir = tmp_path / "run"
  subprocess.run([sys.executable, "-m", "earthgptx_jax.train", "--config=configs/fusion.py:tiny",
                  f"--workdir={workdir}", f"--config.data.data_dir={tmp_path / 'data'}",
                  *overrides], cwd=ROOT, env=env, check=True, timeout=2400)
  return json.loads((workdir / "metrics.json").read_text())


@pytest.mark.slow
def test_tiny_preset_learns_on_synthetic_data(tmp_path):
  metrics = _train_tiny(tmp_path)
  assert metrics["step"] == 1000
  assert metrics["eval/image_caption/CIDEr"] >= 1.0
  assert metrics["eval/region_caption/CIDEr"] >= 0.7
  assert metrics["eval/vqa/vqa_accuracy"] >= 0.3
  assert metrics["eval/referring_segmentation/gIoU"] >= 0.07
  assert metrics["eval/scene_classification/accuracy"] >= 0.33
  assert metrics["eval/score"] >= 0.35
  # Answer-token CE over the last log interval: 0.57 measured, ~6.1 (ln 512) at the start. The
  # total also holds the mask and box terms (3.24 measured; the box cell CE alone is ~1.9).
  assert metrics["ce"] < 1.2


@pytest.mark.slow
def test_tiny_preset_learns_to_name_the_prompted_object(tmp_path):
  """Referring classification alone (the alignment stage set to the whole run and to this one
  task): the answer is the class of the object under a point / box / free-form prompt, so only
  what the model reads at the prompt can beat the class prior. Held out: 300 eval records per
  sensor, of which 95 are referring examples."""
  metrics = _train_tiny(tmp_path, "--config.train.steps=600", "--config.train.alignment_steps=600",
                        "--config.data.alignment_tasks=('referring_classification',)",
                        "--config.data.synthetic.num_eval=300", "--config.train.eval_examples=900")
  assert metrics["eval/referring_classification/n"] >= 80
  assert metrics["eval/referring_classification/accuracy"] >= 0.35  # chance 0.2


@pytest.mark.slow
def test_tiny_preset_learns_to_ground_the_named_object(tmp_path):
  """Box grounding alone (the alignment stage set to the whole run and to this one task): the
  answer is the box of the object the question names, written by the box head. Spelled out as
  text tokens, the same run ended at Acc@0.5 0.0 (README). Held out: 115 box-grounding
  examples of 300 eval records per sensor."""
  metrics = _train_tiny(tmp_path, "--config.train.steps=600", "--config.train.alignment_steps=600",
                        "--config.data.alignment_tasks=('box_grounding',)",
                        "--config.data.synthetic.num_eval=300", "--config.train.eval_examples=900")
  assert metrics["eval/box_grounding/n"] >= 100
  assert metrics["eval/box_grounding/Acc@0.5"] >= 0.15  # measured 0.287
  assert metrics["eval/box_grounding/mean_IoU"] >= 0.15  # measured 0.270
