r"""One-stage fusion training of EarthGPT-X: sharded, checkpointed, resumable, multi-host.

  python -m earthgptx_jax.train --config=configs/fusion.py:tiny --workdir=/tmp/egx_tiny

Everything a run depends on is in the config; it is saved beside every checkpoint. Re-running
the same command resumes from the newest usable checkpoint in `--workdir` (local path or
gs://). SIGTERM (TPU maintenance / preemption) saves a checkpoint and exits 0. The loop is in
training.py; this is the command line.
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from earthgptx_jax import paths, training

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/fusion.py:tiny",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (or gs:// path) for checkpoints, "
                               "TensorBoard events and metrics.")
_BREAK_LOCK = flags.DEFINE_bool("break_lock", False, "Take over --workdir's train.lock left by a "
                                "job on another host that is gone (see workdir_lock.py).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required")
  if not flags.FLAGS["verbosity"].present:  # Orbax/grain INFO lines drown the progress line
    logging.set_verbosity(logging.WARNING)
  paths.resolve_flags("workdir")  # relative to the cwd; Orbax needs absolute paths
  paths.resolve_config_paths(_CONFIG.value)
  cache_dir = _CONFIG.value.train.get("compilation_cache_dir", None)
  if cache_dir:  # a resumed or repeated run skips recompiling (minutes on small CPUs)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  training.train_and_evaluate(_CONFIG.value, _WORKDIR.value, break_lock=_BREAK_LOCK.value)


if __name__ == "__main__":
  app.run(main)
