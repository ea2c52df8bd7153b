r"""One-stage fusion training of EarthGPT-X: sharded, checkpointed, resumable, multi-host.

  python -m earthgptx_jax.train --config=configs/fusion.py:tiny --workdir=/tmp/egx_tiny

Everything a run depends on is in the config; it is saved beside every checkpoint. Re-running
the same command resumes from the newest usable checkpoint in `--workdir` (local path or
gs://). SIGTERM (TPU maintenance / preemption) saves a checkpoint and exits 0. The loop is in
training.py; this is the command line.

A run that fails ends with its cause as the last stderr line, `error: ...`: exit status 2 when
the command, the config or the data must change (a misspelled override, a mesh that does not
fit, a workdir owned by another job), 1 when the run itself failed (no usable checkpoint, too
many bad records, a disk error). `--verbosity=0` also logs the traceback of a known error; an
unexpected one keeps its traceback above the last line.
"""

from __future__ import annotations

from earthgptx_jax import host_memory

if __name__ == "__main__":  # before the imports below, which it would repeat: it restarts
  host_memory.reexec_with_huge_page_malloc()  # the process with huge-page malloc

import difflib
import importlib.util
import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from data_pipelines import bad_records
from earthgptx_jax import checkpointing, cli, paths, sharding, training, workdir_lock

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/fusion.py:tiny",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (or gs:// path) for checkpoints, "
                               "TensorBoard events and metrics.")
_BREAK_LOCK = flags.DEFINE_bool("break_lock", False, "Take over --workdir's train.lock left by a "
                                "job on another host that is gone (see workdir_lock.py).")

# The command, the config or the data must change: exit 2.
_USER_ERRORS = (workdir_lock.WorkdirLockedError, sharding.MeshMismatchError,
                checkpointing.WorkdirNotWritableError)
# The run itself failed (its checkpoints, its data): exit 1.
_RUN_ERRORS = (checkpointing.NoUsableCheckpointError, checkpointing.CheckpointSaveError,
               bad_records.BadRecordFractionError)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PROJECT_DIRS = tuple(os.path.join(_ROOT, d) + os.sep
                      for d in ("earthgptx_jax", "data_pipelines", "configs"))


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {argv[1:]} (settings are --config.NAME=VALUE)", 2)
  if _CONFIG.value is None or _WORKDIR.value is None:
    fail("--config and --workdir are required, e.g. --config=configs/fusion.py:tiny "
         "--workdir=runs/tiny", 2)
  cli.quiet_library_logs()  # Orbax/grain INFO lines drown the progress line
  try:
    paths.resolve_flags("workdir")  # relative to the cwd; Orbax needs absolute paths
    paths.resolve_config_paths(_CONFIG.value)
    cli.use_compilation_cache(_CONFIG.value.train.get("compilation_cache_dir", None))
    result = training.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                         break_lock=_BREAK_LOCK.value)
  except Exception as e:  # noqa: BLE001 — every failure ends with its cause as the last line
    code = exit_code(e)
    if code is None:  # unexpected: keep the traceback for the bug report, cause last
      traceback.print_exc()
      fail(f"{type(e).__name__}: {one_line(e)}", 1)
    logging.info("traceback of the error below", exc_info=True)
    fail(one_line(e), code)
  if result.get("preempted") and "step" not in result:
    # A SIGTERM during the compile left XLA compiling in a daemon thread
    # (training._compile_interruptibly); interpreter shutdown under it can abort (SIGABRT).
    # Nothing was written that needs finalising: no step ran.
    _exit(0)


def exit_code(e: BaseException) -> int | None:
  """2: the command, config or data must change; 1: the run failed; None: unexpected (a bug)."""
  if isinstance(e, _RUN_ERRORS):
    return 1
  if isinstance(e, _USER_ERRORS):
    return 2
  if isinstance(e, (ValueError, KeyError, OSError)) and _raised_by_project(e):
    return 2  # the project's config/data checks name the setting and the value
  if isinstance(e, OSError):  # disk full, permission, network storage: errno and path say it
    return 1
  return None


def _raised_by_project(e: BaseException) -> bool:
  frames = traceback.extract_tb(e.__traceback__)
  return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_PROJECT_DIRS)


def one_line(e: BaseException) -> str:
  text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  return " ".join(text.split()) or type(e).__name__


def fail(message: str, code: int) -> None:
  """Prints `error: message` as the very last line (after any library output) and exits."""
  logging.flush()
  sys.stdout.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)
  # Not sys.exit: at interpreter shutdown a failed async save's thread can still print
  # ("ImportError: sys.meta_path is None"), burying the cause. Everything the run owns (the
  # workdir lock, the checkpoints) was released or finalised when the error left the loop.
  _exit(code)


def _exit(code: int) -> None:
  """Exits at once, skipping interpreter shutdown (and the threads it would wait on)."""
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a mistaken `--config.X=V` override (a misspelled setting, a
  config file that does not load) reported as one line naming the setting: exit 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # a bad value; a config file that fails has its traceback inside
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    fail(lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}", 2)
  except (AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    fail(_override_error(argv, e), 2)


def _override_error(argv: list[str], e: Exception) -> str:
  """The first `--config.a.b` override of argv that names no setting, with the closest names;
  else the library's own message on one line."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  overrides = [m.group(1) for a in argv if (m := re.match(r"--config\.([\w.]+)", a))]
  try:
    config = _load_config(spec)
  except Exception:  # noqa: BLE001 — the config itself does not load: say why, on one line
    return f"--config={spec}: {one_line(e)}"
  for override in overrides:
    node, parts = config, override.split(".")
    for i, part in enumerate(parts):
      keys = [str(k) for k in node.keys()] if hasattr(node, "keys") else []
      if part in keys:
        node = node[part]
        continue
      if not keys:
        break  # below a leaf (e.g. a tuple): ml_collections parses the value itself
      close = difflib.get_close_matches(part, keys, n=3)
      where = "".join(p + "." for p in parts[:i])
      rest = "".join("." + p for p in parts[i + 1:])
      hint = (" (did you mean " + " or ".join(f"--config.{where}{c}{rest}" for c in close) + "?)"
              if close else f"; {'config.' + where[:-1] if where else 'the config'} has: "
              + ", ".join(sorted(keys)))
      return f"--config.{override}: no such setting in {spec}{hint}"
  return f"--config override: {one_line(e)}"


def _load_config(spec: str | None):
  path, _, arg = (spec or "").partition(":")
  module_spec = importlib.util.spec_from_file_location("_egx_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
