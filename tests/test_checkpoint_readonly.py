"""Reading a workdir never writes to it: infer, evaluate (through the Predictor) and export restore
the parameters only, from finalised checkpoints, while a training job may still be saving.

The workdir holds random tiny weights at steps 3 and 7 written as train.py writes them, plus an
in-flight `9.orbax-checkpoint-tmp` folder of a save in progress.
"""

import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from earthgptx_jax import batch as batch_lib
from earthgptx_jax import checkpointing, export, tokenizer as tokenizer_lib, trainer
from earthgptx_jax import predictor as predictor_lib
from earthgptx_jax import workdir_lock
from model_fixtures import tiny_config


def _random_params(config, seed):
  model = trainer.build_model(config)
  example = jax.tree.map(jnp.asarray, batch_lib.example_batch(config, 1))
  shapes = trainer.nn.meta.unbox(jax.eval_shape(
      lambda: model.init(jax.random.key(0), example)["params"]))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir, config, {step: params})."""
  root = tmp_path_factory.mktemp("readonly")
  tok_dir = root / "tok"
  tokenizer_lib.build_tokenizer(["a ship near the plane", "segment the storage tank"] * 20, 300,
                                str(tok_dir))
  config = tiny_config()
  config.model.token_ids = type(config.model.token_ids)(
      tokenizer_lib.special_token_ids(tokenizer_lib.load_tokenizer(str(tok_dir))))
  params = {3: _random_params(config, 3), 7: _random_params(config, 7)}
  wd = root / "run"
  export.save_workdir(config, {"params": params[3], "lora": {}}, wd, step=3,
                      tokenizer_dir=tok_dir)
  other = root / "other"
  export.save_workdir(config, {"params": params[7], "lora": {}}, other, step=7)
  shutil.copytree(other / "checkpoints" / "7", wd / "checkpoints" / "7")
  # A save in progress, as Orbax lays it out before the atomic rename to `9`.
  tmp = wd / "checkpoints" / "9.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp"
  tmp.mkdir(parents=True)
  (tmp / "manifest.ocdbt").write_bytes(b"\0" * 100)
  return wd, config, params


def _snapshot(root: pathlib.Path) -> dict:
  """Every file and folder under root: (kind, size, mtime_ns)."""
  out = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs + files:
      path = pathlib.Path(folder) / name
      st = path.stat()
      out[str(path.relative_to(root))] = (path.is_dir(), st.st_size, st.st_mtime_ns)
  st = root.stat()
  out["."] = (True, st.st_size, st.st_mtime_ns)
  return out


def _assert_equal_trees(got, want):
  got, want = jax.tree.leaves_with_path(got), jax.tree.leaves_with_path(want)
  assert [p for p, _ in got] == [p for p, _ in want]
  for (path, a), (_, b) in zip(got, want):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), path


def test_readers_leave_the_workdir_untouched_while_a_save_is_in_flight(run):
  wd, config, params = run
  with workdir_lock.WorkdirLock(wd):  # a training job owns the workdir; readers take no lock
    before = _snapshot(wd)
    predictor = predictor_lib.Predictor.from_workdir(wd)
    _, exported, step = export.load_workdir(wd)
    got_step, got = checkpointing.load_params(wd, config)
    assert _snapshot(wd) == before
  assert (wd / "checkpoints" / "9.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp").is_dir()
  assert step == got_step == 7  # the newest finalised one, not the save in flight
  for tree in (predictor.params, exported, got):
    _assert_equal_trees(tree, params[7])


def test_load_params_restores_the_parameters_only(run):
  wd, config, params = run
  step, got = checkpointing.load_params(wd, config, step=3)
  assert step == 3
  _assert_equal_trees(got, params[3])  # nothing but the params: no optimizer moments, no step
  mesh = trainer.sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  _, on_mesh = checkpointing.load_params(wd, config, mesh=mesh)
  assert all(x.sharding.mesh == mesh for x in jax.tree.leaves(on_mesh))
  # Relative paths work (users pass `--workdir=workdir/tiny`).
  cwd = os.getcwd()
  try:
    os.chdir(wd.parent)
    assert checkpointing.load_params(wd.name, config)[0] == 7
  finally:
    os.chdir(cwd)


def test_param_bytes_are_a_fraction_of_the_train_state(run):
  """What a reader holds in memory: the params, not the train state (Adam moments, ...)."""
  _, config, params = run
  model = trainer.build_model(config)
  optimizer = trainer.make_optimizer(config, model)
  mesh = trainer.sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  state, _ = trainer.state_shardings(model, optimizer, config, mesh)
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params[7]))
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  print(f"tiny preset: params {param_bytes} B, whole train state {state_bytes} B")
  assert 2 * param_bytes <= state_bytes


def test_a_corrupt_newest_checkpoint_falls_back_without_writing(run, tmp_path):
  wd, config, params = run
  copy = tmp_path / "run"
  shutil.copytree(wd, copy)
  for f in (copy / "checkpoints" / "7" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  before = _snapshot(copy)
  lines = []
  step, got = checkpointing.load_params(copy, config, log=lines.append)
  assert step == 3 and len(lines) == 1 and "falling back to step 3" in lines[0], lines
  _assert_equal_trees(got, params[3])
  with pytest.raises(checkpointing.NoUsableCheckpointError, match="checkpoint 7 .*cannot be"):
    checkpointing.load_params(copy, config, step=7)
  shutil.rmtree(copy / "checkpoints" / "3")
  before = _snapshot(copy)
  with pytest.raises(predictor_lib.InferenceError, match="could be restored"):
    predictor_lib.Predictor.from_workdir(copy)
  assert _snapshot(copy) == before


def test_missing_checkpoints_are_one_clear_error(run, tmp_path):
  wd, config, _ = run
  with pytest.raises(checkpointing.CheckpointNotFoundError, match=r"no checkpoint 5 .*\[3, 7\]"):
    checkpointing.load_params(wd, config, step=5)
  with pytest.raises(predictor_lib.InferenceError, match="--step: no checkpoint 5"):
    predictor_lib.Predictor.from_workdir(wd, step=5)
  empty = tmp_path / "empty"
  shutil.copytree(wd, empty, ignore=shutil.ignore_patterns("[0-9]"))
  with pytest.raises(predictor_lib.InferenceError, match="--workdir: no checkpoint in"):
    predictor_lib.Predictor.from_workdir(empty)
  with pytest.raises(export.ExportError, match="--workdir: no checkpoint in"):
    export.load_workdir(empty)
