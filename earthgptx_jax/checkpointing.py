"""One Orbax CheckpointManager for train state + data-iterator state + config.

Layout: `<workdir>/checkpoints/<step>/{state,data_iter,config}`. Saves are async; a save is
only listed once Orbax has finalised it, so a run killed mid-save leaves the previous step as
the latest. A finalised checkpoint that nevertheless fails to restore (a truncated or corrupted
file) is reported and the next older one is tried; once an older one restores, the unusable ones
are moved aside to `<step>.corrupt` (kept for inspection), so the retrained step is saved again
and a rerun does not fall back again. Restoring takes an abstract state whose leaves carry the
*current* mesh's shardings, so a checkpoint written on one mesh restores onto any other.

Every requested save is written or raises CheckpointSaveError (one line: which step, where, why
and the free space there): a save Orbax declines, a synchronous failure, or an async one, found
by `check()` (cheap, every step), at the next `save`, `wait` or `close`. A failed save deletes
nothing: Orbax removes old steps only after the new one is committed.

Readers (infer, evaluate, export) use `load_params`, never the manager: it lists finalised step
folders itself, restores only the model parameters (a partial restore of `state.trainable`, so
memory ~ params, not params + Adam moments) and creates, modifies or deletes nothing, so a
training job may be saving into the same directory meanwhile.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
from collections.abc import Callable
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import linen as nn
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from earthgptx_jax import config_io, paths, sharding, trainer


class NoUsableCheckpointError(RuntimeError):
  """Every checkpoint in the directory failed to restore."""


class CheckpointNotFoundError(FileNotFoundError):
  """No finalised checkpoint (at the step asked for) in the directory."""


class WorkdirReadError(ValueError):
  """A training workdir that cannot be read; the message names the flag (--workdir / --step)."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint that was asked for was not written (one line: which step, where, why)."""


class SaveDeclinedError(CheckpointSaveError):
  """Orbax declined a requested save: the step (or a newer one) is already in the directory."""


class WorkdirNotWritableError(RuntimeError):
  """The workdir cannot take a file (one line naming the path and the OS error)."""


def _reason(e: BaseException, limit: int = 300) -> str:
  """`Type: message` on one line; an OS error found in the chain (e.g. ENOSPC inside a
  TensorStore error) comes first, since it is the part a person can act on."""
  text = " ".join(str(e).split())
  cause, os_error = e, None
  while cause is not None and os_error is None:
    if isinstance(cause, OSError) and cause.strerror:
      os_error = f"[Errno {cause.errno}] {cause.strerror}"
    cause = cause.__cause__ or cause.__context__
  code = re.search(r"\[os_error_code='?(\d+)'?\]", text)  # how TensorStore reports one
  if os_error is None and code:
    os_error = f"[Errno {code.group(1)}] {os.strerror(int(code.group(1)))}"
  if os_error and os_error not in text:  # the rest is detail: which file, which layer
    return f"{os_error}; {type(e).__name__}: {text[:limit // 2]}..."
  return f"{type(e).__name__}: {text[:limit]}"


def _free_space(directory: epath.Path) -> str:
  """`free space: 1.2 GiB of 100.0 GiB` of the local filesystem holding `directory`."""
  if "://" in os.fspath(directory):
    return "free space: unknown (not a local path)"
  path = os.fspath(directory)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    usage = shutil.disk_usage(path)
  except OSError:
    return "free space: unknown"
  return f"free space: {_size(usage.free)} of {_size(usage.total)}"


def _size(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024:
      return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
    n /= 1024
  return f"{n:.1f} TiB"


def check_writable(directory: str | epath.PathLike, *, flag: str = "--workdir") -> None:
  """Writes, syncs, reads back and deletes a 64 KiB probe file in `directory`, so a workdir that
  cannot take a checkpoint (read-only, full, gone) fails at start, not at the first save after
  data preparation and compilation. Raises WorkdirNotWritableError (one line). Call it after
  taking the workdir lock: a second trainer that is refused writes nothing."""
  directory = epath.Path(paths.resolve(directory))
  probe = directory / f".write_probe.{socket.gethostname()}.{os.getpid()}"
  data = os.urandom(1 << 16)
  try:
    try:
      directory.mkdir(parents=True, exist_ok=True)
      if "://" in os.fspath(probe):
        probe.write_bytes(data)
      else:  # fsync: a full disk may only say so when the blocks are allocated
        with open(os.fspath(probe), "wb") as f:
          f.write(data)
          f.flush()
          os.fsync(f.fileno())
      if probe.read_bytes() != data:
        raise OSError(f"probe file {probe} read back different bytes")
    finally:
      try:
        probe.unlink(missing_ok=True)
      except OSError:
        pass
  except OSError as e:
    raise WorkdirNotWritableError(f"{flag}: cannot write to {directory} ({_reason(e, 200)}; "
                                  f"{_free_space(directory)})") from None


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings: Orbax restores straight onto them."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class Checkpointer:
  """Saves and restores {state, data_iter, config} together; keeps last N and best K."""

  def __init__(self, directory: str | epath.PathLike, ckpt_cfg: ml_collections.ConfigDict):
    self.directory = epath.Path(paths.resolve(directory))  # Orbax rejects relative paths
    self._best_metric = ckpt_cfg.get("best_metric", None)
    policies = [preservation.LatestN(n=int(ckpt_cfg.max_to_keep))]
    if self._best_metric:
      policies.append(preservation.BestN(
          get_metric_fn=lambda metrics: metrics[self._best_metric],
          reverse=ckpt_cfg.get("best_mode", "max") == "min", n=int(ckpt_cfg.get("keep_best", 1)),
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=bool(ckpt_cfg.async_save),
        preservation_policy=preservation.AnyPreservationPolicy(policies),
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data_iter", "config"))
    self._in_flight: int | None = None  # step of the save not yet known to have succeeded

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, *, data_iter=None, config=None,
           metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    """Starts saving `step` (async if configured); True, or CheckpointSaveError. A failure of
    the previous async save is raised here first, as that step's."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    if config is not None:
      items["config"] = ocp.args.JsonSave(json.loads(config.to_json()))
    self.wait()  # Orbax would wait too, but would report the previous failure as this save's
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                                force=force)
    except ocp.checkpoint_manager.StepAlreadyExistsError:
      saved = False
    except Exception as e:  # noqa: BLE001 — any failure means "this step was not written"
      raise self._save_error(step, e) from e
    if not saved:  # a step at or below the newest one: e.g. a damaged one not moved aside
      raise SaveDeclinedError(
          f"checkpoint at step {step} was not written to {self.directory}: Orbax declined the "
          f"save because step {self.manager.latest_step()} is already there (it never "
          "overwrites a step or saves behind the newest one)")
    self._in_flight = step
    return True

  def check(self) -> None:
    """Raises CheckpointSaveError if the async save in flight has failed; cheap enough to call
    every step (it never waits for a save that is still running)."""
    if self._in_flight is not None and not self.manager.is_saving_in_progress():
      self.wait()

  def _save_error(self, step: int | None, e: BaseException) -> CheckpointSaveError:
    kept = [s for s in finalised_steps(self.directory) if s != step]
    return CheckpointSaveError(
        f"checkpoint at step {step if step is not None else '?'} could not be written to "
        f"{self.directory} ({_reason(e)}); {_free_space(self.directory)}; "
        + (f"earlier checkpoints are kept (steps {kept})" if kept else "no earlier checkpoint"))

  def restore(self, step: int, abstract_state: Any, *, data_iter=None) -> Any:
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    return self.manager.restore(step, args=ocp.args.Composite(**items)).state

  def restore_latest(self, abstract_state: Any, *, data_iter=None,
                     log: Callable[[str], None] = logging.warning) -> tuple[int, Any] | None:
    """(step, state) of the newest checkpoint that restores, or None if there is none.

    For training only (it writes): once an older checkpoint restores, each newer one that failed
    is moved aside to `<step>.corrupt`, with one line each through `log`, so that its step is
    saved again when training reaches it. If none restores, nothing is moved (the likelier cause
    is then the config, e.g. a changed model) and NoUsableCheckpointError says why, on one line.
    """
    steps = self.all_steps()
    failed = []  # (step, one-line reason), newest first
    for step in reversed(steps):
      try:
        state = self.restore(step, abstract_state, data_iter=data_iter)
      except Exception as e:  # noqa: BLE001 — any failure means "this checkpoint is unusable"
        failed.append((step, _reason(e, 200)))
        continue
      if failed:
        moved = self._move_aside([s for s, _ in failed])
        for (bad, reason), dest in zip(failed, moved):
          log(f"checkpoint at step {bad} in {self.directory} cannot be restored ({reason}); "
              f"moved aside to {dest}; resuming from step {step}")
      return step, state
    if steps:
      raise NoUsableCheckpointError(
          f"no checkpoint in {self.directory} could be restored (none was moved or deleted; if "
          "the model config changed, use a new --workdir): "
          + "; ".join(f"step {s}: {reason}" for s, reason in failed))
    return None

  def _move_aside(self, steps: list[int]) -> list[epath.Path]:
    """Renames each step folder to `<step>.corrupt` (`.corrupt.1`, ... if taken) on the
    coordinator, then makes every process's manager forget those steps."""
    dests = []
    for step in steps:
      src, dest = self.directory / str(step), self.directory / f"{step}.corrupt"
      if jax.process_index() == 0:
        n = 0
        while dest.exists():
          n += 1
          dest = self.directory / f"{step}.corrupt.{n}"
        try:
          src.rename(dest)
        except OSError as e:
          raise CheckpointSaveError(
              f"cannot move the unusable checkpoint {src} aside to {dest} ({_reason(e, 200)}); "
              "move or delete it, then rerun") from None
      dests.append(dest)
    sharding.wait_for_all_processes("checkpoints moved aside")
    self.manager.reload()
    return dests

  def saved_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self):
    """Blocks until the save in flight is written; CheckpointSaveError if it failed."""
    step, self._in_flight = self._in_flight, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 — the background save of `step` failed
      raise self._save_error(step, e) from e

  def close(self):
    self.wait()
    self.manager.close()


def finalised_steps(directory: str | epath.PathLike) -> list[int]:
  """Steps of the finalised checkpoints in `directory`, oldest first. Read-only: a save in flight
  (`N.orbax-checkpoint-tmp...`, or on gs:// a step folder without its commit marker) and folders
  moved aside (`N.corrupt`) are not steps."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and p.is_dir() and ocp.utils.is_checkpoint_finalized(p))


def load_params(workdir: str | epath.PathLike, config: ml_collections.ConfigDict,
                step: int | None = None, *, mesh: jax.sharding.Mesh | None = None,
                log: Callable[[str], None] = logging.warning) -> tuple[int, Any]:
  """(step, model params with LoRA merged) of `step`, default the newest usable checkpoint of a
  training workdir, restored read-only onto `mesh` (default: one device).

  Only `state.trainable` is read (no optimizer state). Unfinalised saves are skipped; a newest
  checkpoint that fails to restore is reported through `log` and the next older one is tried.
  Raises CheckpointNotFoundError (none, or not `step`) or NoUsableCheckpointError.
  """
  directory = _absolute(workdir) / "checkpoints"
  steps = finalised_steps(directory)
  if step is not None and step not in steps:
    raise CheckpointNotFoundError(f"no checkpoint {step} in {directory} (have {steps})")
  if not steps:
    raise CheckpointNotFoundError(f"no checkpoint in {directory}")
  # One device: the saved shapes are the target (no model trace, seconds of an infer call);
  # a mesh needs the model's logical axes for its shardings.
  target = None if mesh is None else _abstract_trainable(config, mesh)
  errors = []
  for s in [step] if step is not None else reversed(steps):
    try:
      trainable = _restore_trainable(directory / str(s) / "state",
                                     target or _saved_trainable(directory / str(s) / "state"))
      return s, trainer.model_params(trainable, config)
    except Exception as e:  # noqa: BLE001 — any failure means "this checkpoint is unusable"
      reason = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"  # one line
      if step is not None:
        raise NoUsableCheckpointError(
            f"checkpoint {s} in {directory} cannot be restored ({reason})") from None
      errors.append(f"step {s}: {reason}")
      older = [o for o in steps if o < s]
      log(f"checkpoint at step {s} in {directory} cannot be restored ({reason}); "
          + (f"falling back to step {older[-1]}" if older else "no older checkpoint left"))
  raise NoUsableCheckpointError(
      f"no checkpoint in {directory} could be restored: " + "; ".join(errors))


def _absolute(path: str | epath.PathLike) -> epath.Path:
  """Orbax wants absolute paths; a local relative one is taken from the current directory."""
  if "://" in os.fspath(path):
    return epath.Path(path)
  return epath.Path(os.path.abspath(os.fspath(path)))


def _abstract_trainable(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict:
  """`state.trainable` as ShapeDtypeStructs carrying their shardings on `mesh`; no optimizer."""
  model = trainer.build_model(config)
  with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    boxed = jax.eval_shape(
        functools.partial(trainer._init_trainable, model, config),  # noqa: SLF001
        jax.random.key(0))
  shardings = sharding.logical_to_shardings(nn.get_partition_spec(boxed), mesh)
  return abstract_with_shardings(nn.meta.unbox(boxed), shardings)


def _saved_trainable(state_dir: epath.Path) -> dict:
  """`state.trainable` as ShapeDtypeStructs on the first device, read from the checkpoint's own
  metadata (its params and LoRA adapters, {} for those it has none of)."""
  # The handler's metadata: the tree alone (the checkpointer's also wants a step-metadata file,
  # which workdirs written by export.save_workdir do not hold, and warns).
  saved = ocp.PyTreeCheckpointHandler().metadata(state_dir).tree["trainable"]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  leaf = lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
  return {k: jax.tree.map(leaf, saved.get(k) or {}) for k in ("params", "lora")}


def _restore_trainable(state_dir: epath.Path, target: dict) -> dict:
  """A partial restore of `trainable` from a saved train state: only those arrays are read."""
  # Orbax cannot address an empty subtree; LoRA adapters are {} when LoRA is off.
  wanted = {k: v for k, v in target.items() if jax.tree.leaves(v)}
  item = {"trainable": wanted}
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))
  return {k: restored["trainable"].get(k, v) for k, v in target.items()}


def load_workdir_params(workdir: str | os.PathLike, step: int | None = None,
                        ) -> tuple[ml_collections.ConfigDict, int, Any]:
  """(config, step, params) of a training workdir for a reader (infer, evaluate, export):
  `load_params` of its saved config. Every failure is a WorkdirReadError naming the flag."""
  config_file = epath.Path(paths.resolve(workdir)) / "config.json"
  if not config_file.is_file():
    raise WorkdirReadError(f"--workdir: {workdir} has no config.json (not a training workdir)")
  try:
    config = config_io.load_config(config_file)
  except (OSError, json.JSONDecodeError) as e:
    raise WorkdirReadError(f"{config_file}: cannot read the config ({e})") from None
  try:
    step, params = load_params(workdir, config, step)
  except CheckpointNotFoundError as e:
    raise WorkdirReadError(f"{'--workdir' if step is None else '--step'}: {e}") from None
  except NoUsableCheckpointError as e:
    raise WorkdirReadError(f"{'' if step is None else '--step: '}{e}") from None
  return config, step, params
