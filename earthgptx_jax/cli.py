"""What every entry point does first, in one place."""

import os

import jax
from absl import flags, logging

from earthgptx_jax import config_io, paths


def quiet_library_logs() -> None:
  """Library INFO lines (Orbax, grain, TFDS, XLA's backend probe) bury a CLI's own output:
  warnings and up only, unless the user asked with --verbosity."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def use_compilation_cache(cache_dir: str | None) -> None:
  """XLA's persistent cache in `cache_dir` (None: off): a repeated run loads its compiled
  programs instead of compiling them again (tens of seconds for the tiny model on a CPU)."""
  if cache_dir:
    jax.config.update("jax_compilation_cache_dir", paths.resolve(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def use_workdir_compilation_cache(workdir: str | None) -> None:
  """The cache the workdir's training used (its config.json's train.compilation_cache_dir), so
  infer / evaluate / the demo compile once per machine, not once per call. A workdir that
  cannot be read is left to the loader to report. A cache inside the workdir is not used: a
  reader never writes to the workdir it reads (XLA adds every new program to its cache)."""
  try:
    config = config_io.load_config(os.path.join(workdir or "", "config.json"))
  except (OSError, ValueError):
    return
  cache_dir = config.get("train", {}).get("compilation_cache_dir", None)
  if cache_dir and "://" not in cache_dir and "://" not in workdir:
    folder = os.path.realpath(paths.resolve(workdir))
    if os.path.commonpath([os.path.realpath(paths.resolve(cache_dir)), folder]) == folder:
      return
  use_compilation_cache(cache_dir)
