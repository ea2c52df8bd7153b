"""Paths a user gives work relative to the current directory; URLs stay as they are.

The slow test runs README's main command from a temporary directory laid out like a clone
(`configs/` beside the relative `workdir/tiny`), then infer, evaluate, export and build with
relative paths on what it wrote.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import fusion
from earthgptx_jax import checkpointing, paths

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_resolve_makes_local_paths_absolute_and_keeps_urls(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.resolve("workdir/tiny") == str(tmp_path / "workdir" / "tiny")
  assert paths.resolve(pathlib.Path("a")) == str(tmp_path / "a")
  assert paths.resolve("~/x") == os.path.join(os.path.expanduser("~"), "x")
  assert paths.resolve("/abs/./p") == "/abs/p"
  for url in ("gs://bucket/run", "s3://b/k", "file:///tmp/x"):
    assert paths.resolve(url) == url


def _path_fields(node, prefix=""):
  """Dotted names of every config field that names a file or folder (…_path, …_dir)."""
  for key, value in node.items():
    name = f"{prefix}{key}"
    if hasattr(value, "items"):
      yield from _path_fields(value, name + ".")
    elif key.endswith(("_path", "_dir")):
      yield name


@pytest.mark.parametrize("preset", ["tiny", "paper", "gpu1b"])
def test_every_config_path_field_is_resolved(preset, tmp_path, monkeypatch):
  config = fusion.get_config(preset)
  assert sorted(_path_fields(config)) == sorted(paths.CONFIG_PATH_FIELDS)
  monkeypatch.chdir(tmp_path)
  for i, dotted in enumerate(paths.CONFIG_PATH_FIELDS):
    *parents, name = dotted.split(".")
    node = config
    for key in parents:
      node = node[key]
    node[name] = f"rel{i}/x"
  config.lock()  # as config_flags hands it over
  paths.resolve_config_paths(config)
  for i, dotted in enumerate(paths.CONFIG_PATH_FIELDS):
    node = config
    for key in dotted.split("."):
      node = node[key]
    assert node == str(tmp_path / f"rel{i}" / "x"), dotted
  config.data.data_dir = "gs://bucket/data"
  assert paths.resolve_config_paths(config).data.data_dir == "gs://bucket/data"


def test_checkpointer_saves_into_a_relative_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = fusion.get_config("tiny")
  ckpt = checkpointing.Checkpointer("run/checkpoints", config.checkpoint)
  ckpt.save(1, {"w": jnp.arange(3.0)})
  ckpt.wait()
  ckpt.close()
  assert (tmp_path / "run" / "checkpoints" / "1").is_dir()


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device per process, as a user runs it
  env["JAX_PLATFORMS"] = "cpu"
  # The cwd is not the clone: the package comes from ROOT (CI's editable install points there).
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
  return env


def _run(cwd, module, *args):
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=_env(),
                        capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, f"{module} {args}:\n{proc.stderr[-3000:]}"
  return proc


@pytest.mark.slow
def test_readme_command_with_relative_paths_then_infer_evaluate_export(tmp_path):
  cwd = tmp_path / "clone"
  cwd.mkdir()
  (cwd / "configs").symlink_to(ROOT / "configs")
  # The session's XLA cache, reached by a relative path (config.train.compilation_cache_dir).
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if cache:
    (cwd / "xla_cache").symlink_to(cache)
  small = ["--config.data.synthetic.num_train=32", "--config.data.synthetic.num_eval=8"]
  _run(cwd, "earthgptx_jax.train", "--config=configs/fusion.py:tiny", "--workdir=workdir/tiny",
       "--config.train.steps=4", "--config.checkpoint.every_steps=2",
       "--config.train.log_every_steps=2", "--config.train.eval_examples=4",
       "--config.data.data_dir=data", "--config.train.compilation_cache_dir=xla_cache", *small)
  workdir = cwd / "workdir" / "tiny"
  assert (workdir / "checkpoints" / "4" / "_CHECKPOINT_METADATA").exists()
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert metrics["step"] == 4 and any(k.startswith("eval/") for k in metrics)
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["data"]["data_dir"] == str(cwd / "data")  # absolute: valid from any cwd
  assert (cwd / "data").is_dir()

  # Inference: relative workdir, image, overlay; batch mode reads images relative to the cwd.
  (cwd / "images").mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (48, 64, 3), np.uint8)).save(cwd / "images" / "scene.png")
  request = {"image": "images/scene.png", "modality": "optical", "text": "What is in <vp1>?",
             "boxes": ["2,2,30,30"]}
  (cwd / "requests.jsonl").write_text(json.dumps(request) + "\n")
  _run(cwd, "earthgptx_jax.infer", "--workdir=workdir/tiny", "--image=images/scene.png",
       "--text=What is inside <vp1>?", "--box=2,2,30,30", "--out=answer.png",
       "--max_new_tokens=4")
  assert (cwd / "answer.png").is_file()
  _run(cwd, "earthgptx_jax.infer", "--workdir=workdir/tiny", "--requests=requests.jsonl",
       "--results=results.jsonl", "--max_new_tokens=4")
  assert len((cwd / "results.jsonl").read_text().splitlines()) == 1

  _run(cwd, "earthgptx_jax.evaluate", "--workdir=workdir/tiny", "--data_dir=data",
       "--max_examples=4", "--nosemantic", "--out=eval.json")
  assert "summary" in json.loads((cwd / "eval.json").read_text())

  _run(cwd, "earthgptx_jax.export_torch", "--workdir=workdir/tiny", "--out=exported")
  assert (cwd / "exported" / "config.json").is_file()

  _run(cwd, "data_pipelines.build", "--dataset=synthetic_rs/optical", "--data_dir=built",
       *small)
  assert any((cwd / "built").iterdir())


def _readme_commands_module():
  spec = importlib.util.spec_from_file_location("readme_commands",
                                                ROOT / ".ci" / "readme_commands.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_ci_extracts_readmes_two_commands():
  """.ci/run runs these literally: the set-up + main job (relative workdir), then the tests."""
  found = _readme_commands_module().commands((ROOT / "README.md").read_text())
  assert len(found) == 2, found
  setup_and_train, test_command = found
  assert "-m earthgptx_jax.train" in setup_and_train
  assert "--workdir=workdir/tiny" in setup_and_train.split()
  assert "-m pytest" in test_command
  proc = subprocess.run([sys.executable, str(ROOT / ".ci" / "readme_commands.py"), "1"],
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0 and proc.stdout.strip() == setup_and_train, proc.stderr


def test_ci_extraction_reads_only_its_section():
  readme = ("# T\n```bash\nbefore\n```\n## On a fresh machine\ntext\n```bash\na \\\n  --b\n```\n"
            "```python\nnot bash\n```\n### Sub\n```bash\nc\n```\n## Using it\n```bash\nd\n```\n")
  assert _readme_commands_module().commands(readme) == ["a   --b", "c"]
