"""A workdir has one owner, the training job: `<workdir>/train.lock`, held while the job runs.

The coordinator process (jax.process_index() == 0) takes the lock right after creating the
workdir, before any data preparation or compilation, and releases it when the run ends (normally,
by an exception, or after a SIGTERM save). A second trainer on the same workdir stops at start
with one line naming the first (host, pid, start time). Readers (infer, evaluate, export) never
take it: they only read.

Local disks (and NFS): the lock file is opened with O_CREAT and held with `fcntl.flock`, so the
kernel releases it the moment its process dies, however it dies. The file holds the owner's host,
pid, start time and command. A lock file left behind (SIGKILL, a crash) is stale:
  - same host: the flock is free, so its process is gone; it is taken over with a warning line;
  - another host: this host cannot tell whether that job still runs (flock need not reach across
    hosts), so the start is refused. Once you are sure the job named is gone, rerun with
    `--break_lock` or delete `<workdir>/train.lock`.
  `--break_lock` never takes a lock a live process on this host holds.
gs:// (no flock, no create-only write through etils): best effort. An existing lock object is
honoured as above (same host: stale when its pid is dead), otherwise the object is written and
deleted at the end; two jobs started within moments of each other are not caught, and a warning
line says so.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Callable

from absl import logging
from etils import epath

LOCK_NAME = "train.lock"


class WorkdirLockedError(RuntimeError):
  """The workdir belongs to another training job (one clear line)."""


def _owner_info() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "command": " ".join(sys.argv)[:500]}


def _parse(text: str) -> dict | None:
  try:
    info = json.loads(text)
  except ValueError:
    return None
  return info if isinstance(info, dict) and "pid" in info else None


def _describe(info: dict | None) -> str:
  if info is None:
    return "another process (its details are not written yet)"
  return (f"the training job on host {info.get('host')} (pid {info.get('pid')}, "
          f"started {info.get('started')})")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


class WorkdirLock:
  """`with WorkdirLock(workdir): ...` or acquire()/release(); see the module docstring."""

  def __init__(self, workdir: str | os.PathLike, *, break_lock: bool = False,
               log: Callable[[str], None] = logging.warning):
    self.workdir = epath.Path(workdir)
    self.path = self.workdir / LOCK_NAME
    self.break_lock = break_lock
    self.log = log
    self.info: dict | None = None
    self._fd: int | None = None

  def _locked_error(self, info: dict | None, hint: str) -> WorkdirLockedError:
    return WorkdirLockedError(f"--workdir: {self.workdir} is in use by {_describe(info)}; one "
                              f"workdir takes one training job. {hint}")

  def _stale_hint(self) -> str:
    return f"If that job is gone, rerun with --break_lock or delete {self.path}."

  def acquire(self) -> WorkdirLock:
    if "://" in os.fspath(self.path):
      self._acquire_object()
    else:
      self._acquire_file()
    return self

  def _acquire_file(self) -> None:
    path = os.fspath(self.path)
    for _ in range(10):  # retried only when the file is replaced under us
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
          raise self._locked_error(_parse(self._read()),
                                   "Stop it first (it is running and holds the lock).") from None
        if e.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
          self.log(f"{self.path}: this filesystem has no file locks; the workdir lock is "
                   "checked from the file's contents only")
          self._acquire_object()
          return
        raise
      try:
        same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
      except FileNotFoundError:  # released (deleted) by its owner between open and flock
        same_file = False
      if not same_file:
        os.close(fd)
        continue
      try:
        previous = _parse(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
        if previous is not None:
          self._check_stale(previous, flock_free=True)
        self.info = _owner_info()
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(self.info) + "\n").encode(), 0)
        os.fsync(fd)
      except BaseException:
        os.close(fd)
        raise
      self._fd = fd
      return
    raise WorkdirLockedError(f"--workdir: {self.path} keeps being replaced; is another job "
                             "starting on it?")

  def _check_stale(self, previous: dict | None, *, flock_free: bool) -> None:
    """Raises unless the lock left by `previous` may be taken over (logging why it may)."""
    previous = previous or {}
    same_host = previous.get("host") == socket.gethostname()
    try:
      pid = int(previous.get("pid"))
    except (TypeError, ValueError):
      pid = -1
    if same_host and pid == os.getpid() and not flock_free:
      return  # gs:// only: this very process's object, left by a failed delete
    if same_host and (flock_free or not _pid_alive(pid)):
      self.log(f"taking over the stale lock {self.path} of {_describe(previous)}: that process "
               "has ended")
    elif same_host:
      raise self._locked_error(previous, "Stop it first (it is running on this host).")
    elif self.break_lock:
      self.log(f"--break_lock: taking over {self.path} from {_describe(previous or None)}")
    else:
      raise self._locked_error(previous or None, self._stale_hint())

  def _acquire_object(self) -> None:
    self.log(f"{self.path}: the workdir lock is best effort here (no atomic create): two jobs "
             "started at the same moment are not caught")
    if self.path.exists():
      self._check_stale(_parse(self._read()), flock_free=False)
    self.info = _owner_info()
    self.path.write_text(json.dumps(self.info) + "\n")

  def _read(self) -> str:
    try:
      return self.path.read_text()
    except (OSError, UnicodeDecodeError):
      return ""

  def release(self) -> None:
    """Deletes the lock file if it is still ours (a --break_lock elsewhere may have taken it)."""
    if self.info is None:
      return
    try:
      if _parse(self._read()) == self.info:
        self.path.unlink()
    except OSError as e:
      self.log(f"could not remove the workdir lock {self.path}: {e}")
    finally:
      if self._fd is not None:
        os.close(self._fd)  # releases the flock
      self._fd = None
      self.info = None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
