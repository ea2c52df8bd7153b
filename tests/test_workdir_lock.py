"""A workdir has one owner: a second trainer stops at start naming the first; stale locks of dead
processes are taken over; a lock from another host needs --break_lock.

Locks are held by real processes (a small Python subprocess calling the lock API), and the second
trainer is the real `python -m earthgptx_jax.train`, run from a temporary cwd with a relative
workdir.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest

from earthgptx_jax import workdir_lock

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOLD = ("import sys\n"
        "from earthgptx_jax import workdir_lock\n"
        "with workdir_lock.WorkdirLock(sys.argv[1]):\n"
        "  print('locked', flush=True)\n"
        "  sys.stdin.read()\n")


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  env["JAX_PLATFORMS"] = "cpu"
  return env


@pytest.fixture
def holder(tmp_path):
  """A live process holding the lock on tmp_path/run (which also holds a run's files)."""
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "4").mkdir(parents=True)
  (workdir / "config.json").write_text("{}")
  (workdir / "train_log.jsonl").write_text('{"step": 4}\n')
  proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, env=_env(), text=True)
  assert proc.stdout.readline().strip() == "locked"
  yield workdir, proc
  if proc.poll() is None:
    proc.stdin.close()
    proc.wait(timeout=60)


def _snapshot(root: pathlib.Path) -> dict:
  out = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs + files:
      path = pathlib.Path(folder) / name
      st = path.stat()
      out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
  return out


def test_second_trainer_stops_at_start_naming_the_first(holder, tmp_path):
  workdir, proc = holder
  before = _snapshot(tmp_path)
  result = subprocess.run(
      [sys.executable, "-m", "earthgptx_jax.train", f"--config={ROOT}/configs/fusion.py:tiny",
       "--workdir=run", "--config.train.steps=1", "--config.data.data_dir=data"],
      cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
  assert result.returncode != 0
  assert f"pid {proc.pid}," in result.stderr and socket.gethostname() in result.stderr
  assert "--workdir: " in result.stderr and "in use by the training job" in result.stderr
  # It stopped before preparing data or writing anything: the tree is exactly as it was.
  assert _snapshot(tmp_path) == before
  info = json.loads((workdir / workdir_lock.LOCK_NAME).read_text())
  assert info["pid"] == proc.pid and info["host"] == socket.gethostname() and info["started"]
  proc.stdin.close()
  assert proc.wait(timeout=60) == 0
  assert not (workdir / workdir_lock.LOCK_NAME).exists()  # released on exit
  with workdir_lock.WorkdirLock(workdir):  # and free for the next job
    pass


def test_a_live_lock_is_never_broken(holder):
  workdir, proc = holder
  for break_lock in (False, True):
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {proc.pid},"):
      workdir_lock.WorkdirLock(workdir, break_lock=break_lock).acquire()


def test_the_stale_lock_of_a_killed_process_is_taken_over(holder):
  workdir, proc = holder
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert json.loads((workdir / workdir_lock.LOCK_NAME).read_text())["pid"] == proc.pid
  lines = []
  with workdir_lock.WorkdirLock(workdir, log=lines.append):
    assert json.loads((workdir / workdir_lock.LOCK_NAME).read_text())["pid"] == os.getpid()
  assert len(lines) == 1 and "stale" in lines[0] and f"pid {proc.pid}," in lines[0], lines
  assert not (workdir / workdir_lock.LOCK_NAME).exists()


def test_a_lock_from_another_host_needs_break_lock(tmp_path):
  lock = tmp_path / workdir_lock.LOCK_NAME
  other = {"host": "other-host", "pid": 4242, "started": "2025-01-01T00:00:00+00:00"}
  lock.write_text(json.dumps(other))
  with pytest.raises(workdir_lock.WorkdirLockedError,
                     match=r"host other-host \(pid 4242, started 2025-01-01.*--break_lock"):
    workdir_lock.WorkdirLock(tmp_path).acquire()
  assert json.loads(lock.read_text()) == other  # the refused job changed nothing
  lines = []
  with workdir_lock.WorkdirLock(tmp_path, break_lock=True, log=lines.append):
    assert json.loads(lock.read_text())["pid"] == os.getpid()
  assert len(lines) == 1 and "--break_lock" in lines[0] and "other-host" in lines[0]


def test_released_when_the_run_raises(tmp_path):
  with pytest.raises(ZeroDivisionError):
    with workdir_lock.WorkdirLock(tmp_path):
      assert (tmp_path / workdir_lock.LOCK_NAME).exists()
      1 / 0  # noqa: B018
  assert not (tmp_path / workdir_lock.LOCK_NAME).exists()
  # In one process, a second holder is refused too (flock is per open file, not per process).
  with workdir_lock.WorkdirLock(tmp_path):
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()},"):
      workdir_lock.WorkdirLock(tmp_path).acquire()


def test_without_file_locks_the_contents_decide(tmp_path, monkeypatch):
  """gs:// and filesystems without flock: best effort, from the lock file's contents."""
  import errno
  import fcntl

  def no_flock(fd, op):
    raise OSError(errno.ENOSYS, "no locks here")

  monkeypatch.setattr(fcntl, "flock", no_flock)
  live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                          stdin=subprocess.PIPE)
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  lock = tmp_path / workdir_lock.LOCK_NAME
  try:
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid, "started": "t"}))
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {live.pid},"):
      workdir_lock.WorkdirLock(tmp_path, break_lock=True, log=lambda m: None).acquire()
  finally:
    live.stdin.close()
    live.wait()
  lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "t"}))
  lines = []
  with workdir_lock.WorkdirLock(tmp_path, log=lines.append):
    assert json.loads(lock.read_text())["pid"] == os.getpid()
  assert any("best effort" in line for line in lines)
  assert any("stale" in line and f"pid {dead.pid}," in line for line in lines), lines
  assert not lock.exists()
