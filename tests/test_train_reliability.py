"""The training command as a user meets it when things go wrong (issue 22, items 4-7; issue 25.1).

- A failed run ends with its cause as the last stderr line, `error: ...` (exit 2 when the
  command/config must change, 1 when the run failed), not a library traceback.
- SIGTERM at any point exits 0 with a line saying what was (or did not need to be) saved.
- After a SIGTERM and a SIGKILL, the resumed run's train_log.jsonl and TensorBoard scalars equal
  an uninterrupted run's; bad-record totals appear in the progress line, the log and metrics.json.

Each test runs `python -m earthgptx_jax.train` from a temporary cwd with relative paths.
"""

import json
import os
import pathlib
import signal
import struct
import subprocess
import sys
import time

import pytest
from tensorboardX.proto import event_pb2

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Small synthetic data; max_length=120 makes a few records too long (skipped as bad records).
SMALL = ("--config.data.synthetic.num_train=40", "--config.data.synthetic.num_eval=8",
         "--config.train.eval_examples=4", "--config.train.alignment_steps=0",
         "--config.train.peak_flops=1e12")


def _env(devices: int = 1):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  env["JAX_PLATFORMS"] = "cpu"
  if devices == 1:
    env.pop("XLA_FLAGS", None)
  else:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _cmd(*args, workdir="run"):
  return [sys.executable, "-m", "earthgptx_jax.train", f"--config={ROOT}/configs/fusion.py:tiny",
          f"--workdir={workdir}", "--config.data.data_dir=data", *SMALL, *args]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


@pytest.fixture
def cwd(tmp_path, data_root):
  """A temporary cwd whose `data` is the module's synthetic data (generated on first use)."""
  (tmp_path / "data").symlink_to(data_root, target_is_directory=True)
  return tmp_path


def _run(cwd, *args, devices=1):
  result = subprocess.run(_cmd(*args), cwd=cwd, env=_env(devices), capture_output=True,
                          text=True, timeout=900)
  return result.returncode, result.stderr.strip().splitlines()


def test_misspelled_override_is_one_line_naming_the_setting(tmp_path):
  code, lines = _run(tmp_path, "--config.train.stpes=5")
  assert code == 2
  assert lines[-1] == ("error: --config.train.stpes: no such setting in "
                       f"{ROOT}/configs/fusion.py:tiny (did you mean --config.train.steps?)")
  assert len(lines) == 1
  code, lines = _run(tmp_path, "--config.trian.steps=5")
  assert code == 2 and "(did you mean --config.train.steps?)" in lines[-1]


@pytest.mark.parametrize("overrides,named", [
    (("--config.data.mix_window=-8",), "error: data.mix_window: need a whole number of examples"),
    (("--config.data.task_weights.vqa=-1.0",), "error: data.task_weights: "),
    (("--config.train.alignment_steps=5", "--config.data.alignment_tasks=('captions',)"),
     "error: data.alignment_tasks: ('captions',)"),
    (("--config.data.synthetic.max_objects=1",), "error: data.synthetic.max_objects: need >= 2"),
    (("--config.model.vision.convnext.stem_type=conv",), "error: convnext.stem_type: unknown "),
    (("--config.model.vision.convnext.stem_type=overlap_act",
      "--config.model.vision.convnext.patch_size=2"), "error: convnext.patch_size: the "),
    (("--config.model.llm.num_kv_heads=3",), "error: model.llm.num_heads=4 must be a multiple"),
])
def test_bad_setting_is_one_line_and_writes_nothing(tmp_path, overrides, named):
  """Checked before the workdir or the data exist: no new empty workdir, no minutes of data
  generation before the error."""
  code, lines = _run(tmp_path, *overrides)
  assert code == 2, lines[-5:]
  assert lines[-1].startswith(named), lines[-1]
  assert not (tmp_path / "run").exists()
  assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_all_checkpoints_unusable_ends_with_the_cause(cwd):
  state = cwd / "run" / "checkpoints" / "2" / "state"
  state.mkdir(parents=True)
  (state / "_METADATA").write_text("not json")
  (state.parent / "_CHECKPOINT_METADATA").write_text("{}")
  code, lines = _run(cwd, "--config.train.steps=4")
  assert code == 1
  assert lines[-1].startswith("error: no checkpoint in ") and "could be restored" in lines[-1]
  assert not any(line.startswith("Traceback") for line in lines)


@pytest.mark.slow
def test_mesh_that_does_not_fit_names_the_parameter_and_a_mesh_that_fits(cwd):
  code, lines = _run(cwd, "--config.train.steps=4", "--config.mesh.shape=(1,1,4)", devices=4)
  assert code == 2
  last = lines[-1]
  assert last.startswith("error: config.mesh.shape=(1, 1, 4)"), lines[-5:]
  assert "k_proj/kernel of shape (64, 2, 16)" in last and "tensor=4" in last
  assert "--config.mesh.shape='(1, 4, 1)'" in last
  assert not any(line.startswith("Traceback") for line in lines)


def _wait_for(predicate, proc, timeout=600):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.1)
  return False


def _start(cwd, *args):
  out, err = open(cwd / "out.txt", "w"), open(cwd / "err.txt", "w")
  proc = subprocess.Popen(_cmd(*args), cwd=cwd, env=_env(), stdout=out, stderr=err, text=True)
  proc.files = (out, err)
  return proc


def _finish(proc, cwd):
  code = proc.wait(timeout=600)
  for f in proc.files:
    f.close()
  return code, (cwd / "err.txt").read_text().strip().splitlines()


@pytest.mark.slow
def test_sigterm_during_data_preparation_exits_zero_saying_nothing_was_saved(tmp_path):
  # Fresh data, generated first; 1500 records a sensor keep that phase seconds long, so the
  # SIGTERM lands in it (40 take well under a second: the signal then came after it).
  proc = _start(tmp_path, "--config.train.steps=4", "--config.data.synthetic.num_train=1500")
  assert _wait_for(lambda: "generating synthetic_rs/" in (tmp_path / "err.txt").read_text(), proc)
  proc.send_signal(signal.SIGTERM)
  code, lines = _finish(proc, tmp_path)
  assert code == 0, lines[-20:]
  assert lines[-1] == ("SIGTERM while preparing the data: nothing to save (no step trained yet); "
                       "the next run starts from scratch (no checkpoint); exiting")


@pytest.mark.slow
def test_sigterm_during_compile_exits_zero_at_once_saying_nothing_was_saved(cwd):
  # No compilation cache: the compile would take a minute; the SIGTERM must not wait for it.
  proc = _start(cwd, "--config.train.steps=4", "--config.train.compilation_cache_dir=")
  assert _wait_for(lambda: "initialised a new run" in (cwd / "err.txt").read_text(), proc)
  proc.send_signal(signal.SIGTERM)
  code, lines = _finish(proc, cwd)
  assert code == 0, lines[-20:]
  assert lines[-1] == ("SIGTERM while compiling the train step: nothing to save (no step "
                       "trained yet); the next run starts from scratch (no checkpoint); exiting")
  assert not (cwd / "run" / "train_log.jsonl").exists()
  assert not [p for p in (cwd / "run" / "checkpoints").iterdir() if p.name.isdigit()]


def _log(workdir):
  return [json.loads(line) for line in (workdir / "train_log.jsonl").read_text().splitlines()]


def _comparable(entries):
  """The entries without wall-clock figures (measured anew by every run)."""
  timing = {"examples_per_s", "tokens_per_s", "mfu"}
  return [{k: v for k, v in e.items() if k not in timing} for e in entries]


def _scalars(workdir, tag):
  """{step: value} of a TensorBoard tag as TensorBoard shows it: a SessionLog START at step s
  (SummaryWriter's purge_step) hides the events of steps >= s written before it."""
  values = {}
  for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*"),
                     key=lambda p: p.stat().st_mtime_ns):
    data = path.read_bytes()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        values = {s: v for s, v in values.items() if s < event.step}
      for value in event.summary.value:
        if value.tag == tag:
          values[event.step] = value.simple_value
  return values


@pytest.mark.slow
def test_logs_after_sigterm_and_sigkill_equal_the_uninterrupted_run(cwd):
  # An 8-step alignment stage: the run preempted inside steps 5-8 resumes across the switch to
  # the mixture, whose data position must come back too.
  steps = ("--config.train.steps=12", "--config.train.log_every_steps=4",
           "--config.checkpoint.every_steps=6", "--config.checkpoint.async_save=False",
           "--config.data.max_length=120", "--config.data.max_bad_fraction=0.5",
           "--config.train.alignment_steps=8")
  straight = subprocess.run(_cmd(*steps, workdir="straight"), cwd=cwd, env=_env(),
                            capture_output=True, text=True, timeout=900)
  assert straight.returncode == 0, straight.stderr[-3000:]
  reference = _log(cwd / "straight")
  assert [e["step"] for e in reference] == [4, 8, 12]
  # Bad records: in the progress line, the log and metrics.json (running totals).
  assert reference[-1]["bad_records/too_long"] >= 1
  assert "bad records skipped: too_long" in straight.stdout
  metrics = json.loads((cwd / "straight" / "metrics.json").read_text())
  assert metrics["bad_records/too_long"] == reference[-1]["bad_records/too_long"]

  run = cwd / "run"
  # SIGTERM inside the second log interval: its partial sums go with the checkpoint.
  proc = _start(cwd, *steps)
  assert _wait_for(lambda: (run / "train_log.jsonl").exists(), proc)
  proc.send_signal(signal.SIGTERM)
  code, lines = _finish(proc, cwd)
  assert code == 0 and lines[-1].startswith("preempted: checkpoint at step "), lines[-5:]
  # SIGKILL after the entry at step 8, written after the last checkpoint: it must not stay twice.
  proc = _start(cwd, *steps)
  assert _wait_for(lambda: '{"step": 8,' in (run / "train_log.jsonl").read_text(), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  finished = subprocess.run(_cmd(*steps), cwd=cwd, env=_env(), capture_output=True, text=True,
                            timeout=900)
  assert finished.returncode == 0, finished.stderr[-3000:]

  assert _comparable(_log(run)) == _comparable(reference)
  for tag in ("train/loss", "train/ce", "bad_records/too_long"):
    assert _scalars(run, tag) == _scalars(cwd / "straight", tag), tag
