"""The training entry point end to end: exact resume after SIGKILL, SIGTERM, two processes.

Each test runs `python -m earthgptx_jax.train` (or tests/multihost_step.py) in subprocesses,
as a user or a TPU/GPU scheduler would.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device per training process
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _train_cmd(workdir, data_dir, steps, *extra):
  return [sys.executable, "-m", "earthgptx_jax.train", "--config=configs/fusion.py:tiny",
          f"--workdir={workdir}", f"--config.train.steps={steps}",
          "--config.train.log_every_steps=1", "--config.train.eval_examples=4",
          f"--config.data.data_dir={data_dir}", *extra]


def _losses(workdir):
  """step -> loss, the last record of each step (a resumed run rewrites later steps)."""
  out = {}
  for line in (pathlib.Path(workdir) / "train_log.jsonl").read_text().splitlines():
    record = json.loads(line)
    out[record["step"]] = record["loss"]
  return out


def _wait_for(predicate, proc, timeout):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.2)
  return False


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path, data_dir):
  steps = 16
  # Killed after step 4 of a 6-step alignment stage: the resumed run crosses the switch.
  every = ["--config.checkpoint.every_steps=2", "--config.checkpoint.async_save=False",
           "--config.train.alignment_steps=6"]
  straight = tmp_path / "straight"
  subprocess.run(_train_cmd(straight, data_dir, steps, *every), cwd=ROOT, env=_env(), check=True,
                 timeout=900)
  reference = _losses(straight)
  assert sorted(reference) == list(range(1, steps + 1))

  killed = tmp_path / "killed"
  proc = subprocess.Popen(_train_cmd(killed, data_dir, steps, *every), cwd=ROOT, env=_env())
  ckpt = killed / "checkpoints" / "4"
  assert _wait_for(lambda: (ckpt / "_CHECKPOINT_METADATA").exists(), proc, 600)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  subprocess.run(_train_cmd(killed, data_dir, steps, *every), cwd=ROOT, env=_env(), check=True,
                 timeout=900)
  resumed = _losses(killed)
  assert resumed == reference  # bit-exact on CPU, every step


def test_sigterm_saves_and_exits_zero(tmp_path, data_dir):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(_train_cmd(workdir, data_dir, 10000,
                                     "--config.checkpoint.every_steps=100000"),
                          cwd=ROOT, env=_env())
  assert _wait_for(lambda: (workdir / "train_log.jsonl").exists() and
                   len(_losses(workdir)) >= 2, proc, 600)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 0
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] >= 2


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _printed(stdout, name):
  line = [l for l in stdout.splitlines() if l.startswith(name + " ")]
  return json.loads(line[0][len(name) + 1:]) if line else None


def _run_losses(args):
  out = subprocess.run([sys.executable, str(ROOT / "tests" / "multihost_step.py"), *args],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return _printed(out.stdout, "LOSSES"), _printed(out.stdout, "TOKENS")


def test_two_processes_match_one_process(tmp_path):
  single, single_tokens = _run_losses(["single"])
  port = str(_free_port())
  # Files, not pipes: a process blocked on a full stderr pipe that nobody reads stalls its peer
  # at the coordination service's shutdown barrier.
  logs = [(tmp_path / f"p{i}.out", tmp_path / f"p{i}.err") for i in range(2)]
  procs = []
  for i, (out, err) in enumerate(logs):
    with open(out, "w") as stdout, open(err, "w") as stderr:
      procs.append(subprocess.Popen(
          [sys.executable, str(ROOT / "tests" / "multihost_step.py"), port, str(i)], cwd=ROOT,
          env=_env(), stdout=stdout, stderr=stderr, text=True))
  for p in procs:
    p.wait(timeout=900)
  assert all(p.returncode == 0 for p in procs), "".join(
      err.read_text()[-3000:] for _, err in logs)
  multi = _printed(logs[0][0].read_text(), "LOSSES")
  assert len(multi) == len(single) == 3
  # Tokens per step (tokens/s): the global count, from the step's replicated metric.
  assert _printed(logs[0][0].read_text(), "TOKENS") == single_tokens
  for a, b in zip(single, multi):
    assert abs(a - b) <= 1e-5 * abs(a)
