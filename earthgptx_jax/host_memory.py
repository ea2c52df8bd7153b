"""Huge pages for the host allocator's large blocks, set before the process does any work.

XLA:CPU allocates each run's temporary buffer (138 MB for the tiny train step) with
posix_memalign from an Eigen worker thread. glibc serves a block that large with a fresh mmap in
a thread's arena whatever M_MMAP_THRESHOLD says, and unmaps it on free, so every step faults
in all its pages again: 33,900 page faults and ~75 ms of kernel time a tiny step on 2 cores.
glibc >= 2.35's `glibc.malloc.hugetlb=1` tunable maps such blocks with transparent huge pages
(2 MB faults): the tiny step measures 0.090 s against 0.144 s (docs/experiments.md). Tunables
are read when a process starts, so an entry point that wants them re-executes itself once,
before its imports, with the tunable added to GLIBC_TUNABLES.
"""

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, int] | None:
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # e.g. "glibc 2.36"
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None
  except (ValueError, OSError, AttributeError):  # not glibc (musl, macOS)
    return None


def _transparent_huge_pages_usable() -> bool:
  try:
    with open(_THP_MODE) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def huge_page_environment(environ: dict[str, str]) -> dict[str, str] | None:
  """`environ` with the tunable added to GLIBC_TUNABLES, or None when this host cannot use it
  or the user already set it (`GLIBC_TUNABLES=glibc.malloc.hugetlb=0` turns it off)."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  if TUNABLE in tunables or sys.platform != "linux":
    return None
  version = _glibc_version()
  if version is None or version < (2, 35) or not _transparent_huge_pages_usable():
    return None
  return dict(environ, GLIBC_TUNABLES=f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1")


def reexec_with_huge_page_malloc() -> None:
  """Restarts this process (same pid, argv and interpreter flags) with huge-page malloc, once;
  returns when it is already on, or unavailable. Only for a command's __main__, before its
  imports: it replaces the running program."""
  environ = huge_page_environment(dict(os.environ))
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
  except OSError:  # the interpreter cannot be re-run (a frozen binary): go on without
    return
