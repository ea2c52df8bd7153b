"""One Orbax CheckpointManager for train state + data-iterator state + config.

Layout: `<workdir>/checkpoints/<step>/{state,data_iter,config}`. Saves are async; a save is
only listed once Orbax has finalised it, so a run killed mid-save leaves the previous step as
the latest. A finalised checkpoint that nevertheless fails to restore (a truncated or corrupted
file) is reported and the next older one is tried. Restoring takes an abstract state whose
leaves carry the *current* mesh's shardings, so a checkpoint written on one mesh restores onto
any other.

Readers (infer, evaluate, export) use `load_params`, never the manager: it lists finalised step
folders itself, restores only the model parameters (a partial restore of `state.trainable`, so
memory ~ params, not params + Adam moments) and creates, modifies or deletes nothing, so a
training job may be saving into the same directory meanwhile.
"""

from __future__ import annotations

import functools
import json
import os
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

from earthgptx_jax import paths, sharding, trainer


class NoUsableCheckpointError(RuntimeError):
  """Every checkpoint in the directory failed to restore."""


class CheckpointNotFoundError(FileNotFoundError):
  """No finalised checkpoint (at the step asked for) in the directory."""


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

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, *, data_iter=None, config=None,
           metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    if config is not None:
      items["config"] = ocp.args.JsonSave(json.loads(config.to_json()))
    return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

  def restore(self, step: int, abstract_state: Any, *, data_iter=None) -> Any:
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    return self.manager.restore(step, args=ocp.args.Composite(**items)).state

  def restore_latest(self, abstract_state: Any, *, data_iter=None,
                     log: Callable[[str], None] = logging.warning) -> tuple[int, Any] | None:
    """(step, state) of the newest checkpoint that restores, or None if there is none.

    A failing checkpoint is reported and skipped; if all fail, NoUsableCheckpointError.
    """
    steps = self.all_steps()
    errors = []
    for step in reversed(steps):
      try:
        return step, self.restore(step, abstract_state, data_iter=data_iter)
      except Exception as e:  # noqa: BLE001 — any failure means "this checkpoint is unusable"
        errors.append(f"step {step}: {type(e).__name__}: {str(e)[:200]}")
        older = [s for s in steps if s < step]
        log(f"checkpoint at step {step} in {self.directory} cannot be restored "
            f"({type(e).__name__}: {str(e)[:200]}); "
            + (f"falling back to step {older[-1]}" if older else "no older checkpoint left"))
    if steps:
      raise NoUsableCheckpointError(
          f"no checkpoint in {self.directory} could be restored: " + "; ".join(errors))
    return None

  def saved_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
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
  if mesh is None:
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  target = _abstract_trainable(config, mesh)
  errors = []
  for s in [step] if step is not None else reversed(steps):
    try:
      trainable = _restore_trainable(directory / str(s) / "state", target)
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
