"""train.py's real loop and evaluation in 2 processes x 4 CPU devices, as on a pod (README,
Multi-host): the same losses and metrics as one process with 8 devices, also when the tensor
axis spans the processes; a SIGTERM to one process stops both at the same step with one
checkpoint, exit 0.

Each process is `python -m earthgptx_jax.train ... --config.distributed.*` on localhost, with
XLA_FLAGS=--xla_force_host_platform_device_count=4; the workdir is shared, as gs:// is on a pod.
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
# Two data shards in every run, so one process loading both sees the same batches as two
# processes loading one each. The per-leaf optimizer, as the presets that shard use: its moments
# are sharded like the params, across the processes where the tensor axis spans them.
_COMMON = ["--config=configs/fusion.py:tiny", "--config.train.log_every_steps=1",
           "--config.train.eval_examples=8", "--config.train.eval_every_steps=2",
           "--config.checkpoint.every_steps=2", "--config.data.shards=2",
           "--config.train.flat_optimizer=False"]


def _env(devices: int):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _cmd(workdir, data_dir, steps, *extra):
  return [sys.executable, "-m", "earthgptx_jax.train", *_COMMON, f"--workdir={workdir}",
          f"--config.train.steps={steps}", f"--config.data.data_dir={data_dir}", *extra]


def _start_two(workdir, data_dir, steps, logs, *extra):
  """The two processes of one job; their output in files (a full pipe nobody reads would stall
  a process, and its peer with it, at the coordination service's barriers)."""
  port = _free_port()
  procs = []
  for i in range(2):
    dist = ["--config.distributed.enabled=True",
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"]
    with open(logs / f"p{i}.out", "w") as out, open(logs / f"p{i}.err", "w") as err:
      procs.append(subprocess.Popen(_cmd(workdir, data_dir, steps, *dist, *extra), cwd=ROOT,
                                    env=_env(4), stdout=out, stderr=err))
  return procs


def _wait_ok(procs, logs, timeout=1500):
  for p in procs:
    p.wait(timeout=timeout)
  assert [p.returncode for p in procs] == [0, 0], "\n".join(
      (logs / f"p{i}.err").read_text()[-3000:] for i in range(2))


_TIMING = {"examples_per_s", "tokens_per_s", "mfu"}  # wall-clock figures: never equal


def _without_timing(entry: dict) -> dict:
  return {k: v for k, v in entry.items() if k not in _TIMING}


def _log(workdir):
  return [_without_timing(json.loads(line))
          for line in (workdir / "train_log.jsonl").read_text().splitlines()]


def _metrics(workdir):
  return _without_timing(json.loads((workdir / "metrics.json").read_text()))


def _positions(checkpoint) -> list[str]:
  """The data-position files in a checkpoint: one per process that saved it."""
  return sorted(p.name for p in (checkpoint / "data_iter").iterdir()
                if p.name.startswith("process_"))


def _close(a, b, rel=1e-5):
  if isinstance(a, dict):
    assert a.keys() == b.keys()
    for k in a:
      assert abs(a[k] - b[k]) <= rel * max(abs(a[k]), 1.0), (k, a[k], b[k])
  else:
    for x, y in zip(a, b, strict=True):
      _close(x, y, rel)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_dir):
  """One process, 8 devices, mesh (1, 4, 2)."""
  workdir = tmp_path_factory.mktemp("single") / "run"
  subprocess.run(_cmd(workdir, data_dir, 3, "--config.mesh.shape=(1,4,2)"), cwd=ROOT,
                 env=_env(8), check=True, timeout=1500)
  return _log(workdir), _metrics(workdir)


# (Not (1, 8, 1): the tiny mask decoder's 4-wide heads do not split 8 ways.)
@pytest.mark.parametrize("mesh", [
    # (2, 4, 1): data across the processes; each holds its half of the rows, loads one shard.
    ["--config.mesh.shape=(2,4,1)"],
    # (1, 4, 1) in each process x (1, 1, 2) across them = (1, 4, 2): the tensor axis spans the
    # processes, so both hold every row and load both shards (the same examples).
    ["--config.mesh.shape=(1,4,1)", "--config.mesh.dcn_shape=(1,1,2)"],
], ids=["data_across", "tensor_across"])
def test_two_processes_train_and_evaluate_as_one(tmp_path, data_dir, single, mesh):
  workdir = tmp_path / "run"
  _wait_ok(_start_two(workdir, data_dir, 3, tmp_path, *mesh), tmp_path)
  log, metrics = single
  multi_log = _log(workdir)
  assert [e["step"] for e in multi_log] == [1, 2, 3]
  _close(multi_log, log)  # losses, per-task CE, grad norms, learning rate, every step
  multi_metrics = _metrics(workdir)
  assert any(k.startswith("eval/") for k in multi_metrics)
  _close(multi_metrics, metrics)  # the final evaluation's metrics too
  # Both processes saved their data position with every checkpoint.
  assert _positions(workdir / "checkpoints" / "2") == ["process_0-of-2.json",
                                                         "process_1-of-2.json"]


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path, data_dir):
  workdir = tmp_path / "run"
  procs = _start_two(workdir, data_dir, 10000, tmp_path, "--config.mesh.shape=(2,4,1)",
                     "--config.checkpoint.every_steps=100000", "--config.train.eval_every_steps=0")
  log = workdir / "train_log.jsonl"
  deadline = time.time() + 1500
  while not (log.exists() and len(log.read_text().splitlines()) >= 2):
    assert time.time() < deadline and all(p.poll() is None for p in procs), "\n".join(
        f"process {i} (exit {p.poll()}): " + (tmp_path / f"p{i}.err").read_text()[-3000:]
        for i, p in enumerate(procs))
    time.sleep(0.5)
  procs[1].send_signal(signal.SIGTERM)  # not the coordinator: the service tells process 0
  _wait_ok(procs, tmp_path, timeout=600)
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert len(steps) == 1 and steps[0] >= 2
  # One checkpoint, written by both at the same step: each process's data position is in it.
  assert _positions(workdir / "checkpoints" / str(steps[0])) == ["process_0-of-2.json",
                                                                  "process_1-of-2.json"]
  assert f"preempted: checkpoint at step {steps[0]} written" in (tmp_path / "p0.err").read_text()
