"""What a newcomer reads while the main job generates its data: our one line per sensor, not
TFDS's "Downloading and preparing dataset Unknown size" (nothing is downloaded) or its warning
that the new folder has no dataset_info.json."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
from configs import fusion
from data_pipelines import builders
config = fusion.get_config("tiny")
config.data.synthetic.num_train, config.data.synthetic.num_eval = 4, 2
builders.ensure_synthetic(sys.argv[1], config)
"""


def test_generating_the_synthetic_data_says_what_it_does(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  run = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "data")], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=600, check=True)
  output = run.stdout + run.stderr
  for modality in ("optical", "sar", "infrared"):
    assert f"generating synthetic_rs/{modality} (4 train + 2 held-out records)" in output
  assert "Downloading" not in output and "dataset_info.json" not in output, output
