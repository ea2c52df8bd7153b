"""Jitted model functions kept across processes as exported programs, so a new process does not
trace them again.

XLA's persistent cache (cli.use_compilation_cache) saves compiling, but a program is found in
it only after the function has been traced and lowered: for the tiny model's visual prefill and
output heads Flax traces for seconds, most of a repeated `infer` call. `Stored` keys a jitted
function *before* tracing, by everything its program depends on — the function's name, the
model config, the arguments' shapes, dtypes and shardings, this package's source, the jax /
jaxlib / flax versions, the backend and XLA's flags — and keeps its `jax.export` program
(StableHLO, portable) in a folder beside XLA's cache. A later process deserialises it (tens of
ms) and calls it through one jit, whose compiled form XLA's cache holds.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import tempfile
from collections.abc import Callable

import flax
import jax
import jaxlib
import ml_collections
from absl import logging
from jax import export

_PACKAGE = pathlib.Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def _environment() -> str:
  """What any stored program depends on besides its own function and arguments."""
  source = hashlib.sha256()
  for path in sorted(_PACKAGE.rglob("*.py")):
    source.update(path.relative_to(_PACKAGE).as_posix().encode() + b"\0" + path.read_bytes())
  device = jax.devices()[0]
  return "\n".join([
      source.hexdigest(), jax.__version__, jaxlib.__version__, flax.__version__,
      device.platform, device.device_kind, os.environ.get("XLA_FLAGS", ""),
      *(f"{name}={getattr(jax.config, name)}" for name in (
          "jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl"))])


def _signature(args: tuple) -> str:
  leaves, treedef = jax.tree.flatten(args)
  return repr(treedef) + "".join(
      f"\n{x.shape} {x.dtype} {getattr(x, 'weak_type', False)} {getattr(x, 'sharding', None)}"
      for x in leaves)


class Stored:
  """`jitted(*args)` with its program kept in `directory` as `<name>-<key>.jax_exported`.
  Positional array arguments only (no static ones); one program per argument signature."""

  def __init__(self, jitted: Callable, name: str, directory: str | os.PathLike, context: str):
    self._jitted = jitted
    self._name = name
    self._directory = pathlib.Path(directory)
    self._context = context  # e.g. the model config: what the function's closure holds
    self._calls: dict[str, Callable] = {}

  def __call__(self, *args):
    signature = _signature(args)
    call = self._calls.get(signature)
    if call is None:
      call = self._calls[signature] = self._load_or_export(signature, args)
    return call(*args)

  def _load_or_export(self, signature: str, args: tuple) -> Callable:
    key = hashlib.sha256("\n".join([self._name, self._context, _environment(), signature])
                         .encode()).hexdigest()[:32]
    path = self._directory / f"{self._name}-{key}.jax_exported"
    try:
      program = export.deserialize(bytearray(path.read_bytes()))
    except FileNotFoundError:
      program = None
    except Exception as e:  # noqa: BLE001 — an unreadable entry is exported again, below
      logging.warning("stored program %s cannot be read (%s); exporting it again", path, e)
      program = None
    if program is None:
      try:
        program = export.export(self._jitted)(*args)
        _write_atomic(path, program.serialize())
      except Exception as e:  # noqa: BLE001 — not exportable or not writable: plain jit
        logging.warning("program %s not stored (%s: %s)", self._name, type(e).__name__, e)
        return self._jitted
    return jax.jit(program.call)


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
  """Another process may read the folder meanwhile: it sees the whole file or none."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o644)  # as XLA's cache files: readable by whoever shares the cache
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def for_model(config: ml_collections.ConfigDict) -> Callable[[str, Callable], Callable] | None:
  """A Generator's `programs` hook: its jitted functions as `Stored` ones in a folder beside
  XLA's persistent cache (`exported/`), or None where that cache is off."""
  cache_dir = jax.config.jax_compilation_cache_dir
  if not cache_dir:
    return None
  context = config.model.to_json(sort_keys=True)
  directory = pathlib.Path(cache_dir) / "exported"

  def programs(name: str, jitted: Callable) -> Callable:
    return Stored(jitted, name, directory, context)
  return programs

