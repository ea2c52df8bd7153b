"""Checkpoints that never lie: a damaged newest checkpoint is moved aside and its step saved again;
every requested save is written or reported; a workdir that cannot take files (read-only, full)
fails at start, and a save that fails later (disk full) stops the run with one line.

Disk-full cases run on a small tmpfs (`mount -t tmpfs`), skipped where this process may not
mount one. The slow tests run `python -m earthgptx_jax.train` from a temporary cwd with relative
paths, as a user would.
"""

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fusion
from earthgptx_jax import checkpointing

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ckpt_config(**overrides):
  config = fusion.get_config("tiny").checkpoint
  config.async_save = True
  for k, v in overrides.items():
    config[k] = v
  return config


def _tree(value, n=1000):
  """Random floats (incompressible: Orbax compresses what it writes) starting with `value`."""
  w = np.random.default_rng(int(value * 10)).standard_normal(n).astype(np.float32)
  w[0] = value
  return {"w": jnp.asarray(w), "b": jnp.arange(4, dtype=jnp.int32)}


def _abstract(tree):
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), tree)


def _corrupt(step_dir: pathlib.Path):
  """Truncates every data file of the saved train state to half its size."""
  for f in (step_dir / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _saved(directory, steps, **config):
  ckpt = checkpointing.Checkpointer(directory, _ckpt_config(**config))
  for step in steps:
    ckpt.save(step, _tree(float(step)))
  ckpt.close()


@contextlib.contextmanager
def _tmpfs(path: pathlib.Path, size: str):
  path.mkdir(parents=True, exist_ok=True)
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True, text=True)
  if proc.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()[:200]})")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder: pathlib.Path, leave: int = 0):
  """Writes a filler file until the filesystem is full (or only `leave` bytes are free)."""
  with open(folder / "filler", "wb") as f:
    chunk = b"\0" * 4096
    try:
      while shutil.disk_usage(folder).free > leave:
        f.write(chunk)
        f.flush()
    except OSError:
      pass


# -- moving a damaged checkpoint aside ---------------------------------------------------------


def test_a_damaged_newest_checkpoint_is_moved_aside_and_its_step_saved_again(tmp_path):
  directory = tmp_path / "checkpoints"
  _saved(directory, [2, 4])
  _corrupt(directory / "4")
  (directory / "4.corrupt").mkdir()  # left by an earlier repair: the name takes a suffix
  lines = []
  ckpt = checkpointing.Checkpointer(directory, _ckpt_config())
  step, state = ckpt.restore_latest(_abstract(_tree(0.0)), log=lines.append)
  assert step == 2 and float(state["w"][0]) == 2.0
  assert len(lines) == 1, lines
  assert "step 4" in lines[0] and "4.corrupt.1" in lines[0] and "resuming from step 2" in lines[0]
  assert (directory / "4.corrupt.1" / "state").is_dir() and not (directory / "4").exists()
  assert ckpt.all_steps() == [2]
  assert ckpt.save(4, _tree(4.5))  # was silently skipped: Orbax still listed the damaged 4
  ckpt.close()
  assert checkpointing.finalised_steps(directory) == [2, 4]
  again = checkpointing.Checkpointer(directory, _ckpt_config())
  step, state = again.restore_latest(_abstract(_tree(0.0)), log=lines.append)
  assert step == 4 and float(state["w"][0]) == 4.5 and len(lines) == 1
  again.close()


def test_when_no_checkpoint_restores_nothing_is_moved_and_the_error_is_one_line(tmp_path):
  directory = tmp_path / "checkpoints"
  _saved(directory, [2, 4])
  before = sorted(p.name for p in directory.iterdir())
  ckpt = checkpointing.Checkpointer(directory, _ckpt_config())
  lines = []
  wrong = _abstract({"w": jnp.zeros((7,), jnp.float32), "b": jnp.zeros((4,), jnp.int32)})
  with pytest.raises(checkpointing.NoUsableCheckpointError) as e:
    ckpt.restore_latest(wrong, log=lines.append)
  ckpt.close()
  message = str(e.value)
  assert "\n" not in message and "step 4:" in message and "step 2:" in message
  assert str(directory) in message and "none was moved" in message
  assert sorted(p.name for p in directory.iterdir()) == before and not lines


def test_a_save_orbax_declines_is_an_error_not_a_silent_skip(tmp_path):
  directory = tmp_path / "checkpoints"
  _saved(directory, [2, 4])
  ckpt = checkpointing.Checkpointer(directory, _ckpt_config())
  for step, force in ((3, False), (4, False), (4, True)):
    with pytest.raises(checkpointing.SaveDeclinedError,
                       match=rf"step {step} was not written to {directory}.*step 4 is already"):
      ckpt.save(step, _tree(0.0), force=force)
  ckpt.close()
  assert checkpointing.finalised_steps(directory) == [2, 4]


# -- a workdir that cannot take files ------------------------------------------------------------


def test_check_writable_leaves_nothing_behind_and_creates_the_folder(tmp_path):
  checkpointing.check_writable(tmp_path / "new" / "run")
  assert list((tmp_path / "new" / "run").iterdir()) == []


def test_check_writable_on_a_full_disk_is_one_line_naming_the_path(tmp_path):
  with _tmpfs(tmp_path / "disk", "1m") as disk:
    (disk / "run").mkdir()
    _fill(disk)
    with pytest.raises(checkpointing.WorkdirNotWritableError) as e:
      checkpointing.check_writable(disk / "run")
    message = str(e.value)
    assert message.startswith(f"--workdir: cannot write to {disk / 'run'} (")
    assert "No space left on device" in message and "free space: 0 B of 1.0 MiB" in message
    assert "\n" not in message and sorted(p.name for p in (disk / "run").iterdir()) == []


def test_an_async_save_that_fails_is_reported_and_keeps_the_earlier_checkpoint(tmp_path):
  small, big = _tree(1.0, 1000), _tree(2.0, 1 << 20)  # 4 KB and 4 MiB of floats
  with _tmpfs(tmp_path / "disk", "2m") as disk:
    directory = disk / "checkpoints"
    ckpt = checkpointing.Checkpointer(directory, _ckpt_config(max_to_keep=1))
    ckpt.save(1, small)
    ckpt.wait()
    ckpt.save(2, big)  # async: the write fails in the background
    while ckpt.manager.is_saving_in_progress():  # training steps go on meanwhile
      time.sleep(0.01)
    with pytest.raises(checkpointing.CheckpointSaveError) as e:
      ckpt.check()  # the next step after the failure
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint at step 2 could not be written to {directory} (")
    assert "No space left on device" in message and "free space: " in message
    assert "earlier checkpoints are kept (steps [1])" in message
    assert checkpointing.finalised_steps(directory) == [1]
    again = checkpointing.Checkpointer(directory, _ckpt_config())
    step, state = again.restore_latest(_abstract(small))
    assert step == 1 and np.array_equal(np.asarray(state["w"]), np.asarray(small["w"]))
    again.close()


# -- the training CLI ----------------------------------------------------------------------------


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device per process, as a user runs it
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
  return env


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
  """A cwd laid out like a clone (`configs/`), sharing the session's XLA cache as `xla_cache`."""
  cwd = tmp_path_factory.mktemp("clone")
  (cwd / "configs").symlink_to(ROOT / "configs")
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if cache:
    os.makedirs(cache, exist_ok=True)
    (cwd / "xla_cache").symlink_to(cache)
  return cwd


def _train(cwd, workdir, steps, *extra):
  """`python -m earthgptx_jax.train` with relative paths, checkpoints every 2 steps (all kept)."""
  cache = ["--config.train.compilation_cache_dir=xla_cache"] if (cwd / "xla_cache").exists() else []
  return subprocess.run(
      [sys.executable, "-m", "earthgptx_jax.train", "--config=configs/fusion.py:tiny",
       f"--workdir={workdir}", f"--config.train.steps={steps}",
       "--config.checkpoint.every_steps=2", "--config.checkpoint.max_to_keep=4",
       "--config.train.eval_examples=4",
       "--config.data.data_dir=data", "--config.data.synthetic.num_train=32",
       "--config.data.synthetic.num_eval=8", *cache, *extra],
      cwd=cwd, env=_env(), capture_output=True, text=True, timeout=1200)


def _params(workdir, step):
  from earthgptx_jax import config_io
  config = config_io.load_config(workdir / "config.json")
  return checkpointing.load_params(workdir, config, step=step)[1]


def _assert_equal_trees(got, want):
  got, want = jax.tree.leaves_with_path(got), jax.tree.leaves_with_path(want)
  assert [p for p, _ in got] == [p for p, _ in want]
  for (path, a), (_, b) in zip(got, want):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), path


def _losses(workdir):
  out = {}
  for line in (workdir / "train_log.jsonl").read_text().splitlines():
    record = json.loads(line)
    out[record["step"]] = record["loss"]
  return out


@pytest.fixture(scope="module")
def straight(clone):
  """An uninterrupted 8-step run: checkpoints 2, 4, 6 and 8."""
  proc = _train(clone, "straight", 8, "--config.train.log_every_steps=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  workdir = clone / "straight"
  assert checkpointing.finalised_steps(workdir / "checkpoints") == [2, 4, 6, 8]
  return workdir


def _last_line(stderr: str) -> str:
  return [line for line in stderr.splitlines() if line.strip()][-1]


@pytest.mark.slow
def test_a_rerun_repairs_a_damaged_final_checkpoint_to_equal_the_uninterrupted_one(clone,
                                                                                   straight):
  workdir = clone / "repaired"
  shutil.copytree(straight, workdir)  # the same bytes as training it again
  _corrupt(workdir / "checkpoints" / "8")
  proc = _train(clone, "repaired", 8, "--config.train.log_every_steps=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  checkpoints = workdir / "checkpoints"
  assert checkpointing.finalised_steps(checkpoints) == [2, 4, 6, 8]
  # Before the fix, the save of 8 was skipped and the damaged 8 stayed the newest.
  _assert_equal_trees(_params(workdir, 8), _params(straight, 8))  # the retrained final state
  assert _losses(workdir) == _losses(straight)
  lines = [line for line in proc.stderr.splitlines() if "cannot be restored" in line]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert "step 8" in lines[0] and "8.corrupt" in lines[0] and "resuming from step 6" in lines[0]
  assert (checkpoints / "8.corrupt" / "state").is_dir()


@pytest.mark.slow
def test_disk_full_at_a_save_stops_the_run_with_one_line_and_keeps_the_earlier_one(clone,
                                                                                   straight):
  def pages(folder):
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in folder.rglob("*") if f.is_file())
  one = pages(straight / "checkpoints" / "2")
  rest = pages(straight) - pages(straight / "checkpoints")
  # Room for the run's other files and one and a half checkpoints: 2 is written, 4 is not.
  with _tmpfs(clone / "disk", str(rest + one * 3 // 2)):
    # max_to_keep=1: the save of 4 would delete 2 once written; it never is.
    proc = _train(clone, "disk/run", 8, "--config.train.log_every_steps=100",
                  "--config.checkpoint.max_to_keep=1")
    checkpoints = clone / "disk" / "run" / "checkpoints"
    assert proc.returncode != 0
    last = _last_line(proc.stderr)
    print(last)
    assert f"checkpoint at step 4 could not be written to {checkpoints} (" in last, last
    assert "No space left on device" in last and "free space: " in last, last
    assert "earlier checkpoints are kept (steps [2])" in last, last
    assert checkpointing.finalised_steps(checkpoints) == [2]
    assert not (clone / "disk" / "run" / "metrics.json").exists()
    _assert_equal_trees(_params(clone / "disk" / "run", 2), _params(straight, 2))


def test_a_workdir_without_room_fails_at_start_naming_it(clone):
  with _tmpfs(clone / "full", "1m") as disk:
    _fill(disk, leave=8192)  # room for the lock file, not for a checkpoint
    proc = _train(clone, "full/run", 2)
    assert proc.returncode != 0
    last = _last_line(proc.stderr)
    assert f"--workdir: cannot write to {disk / 'run'} (" in last, proc.stderr[-3000:]
    assert "No space left on device" in last and "free space: " in last, last
    assert "compiled" not in proc.stderr and not (disk / "run" / "tokenizer").exists()
    assert sorted(p.name for p in (disk / "run").iterdir()) == []
