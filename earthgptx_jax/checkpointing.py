"""One Orbax CheckpointManager for train state + data-iterator state + config.

Layout: `<workdir>/checkpoints/<step>/{state,data_iter,config}`. Saves are async; a save is
only listed once Orbax has finalised it, so a run killed mid-save leaves the previous step as
the latest. A finalised checkpoint that nevertheless fails to restore (a truncated or corrupted
file) is reported and the next older one is tried. Restoring takes an abstract state whose
leaves carry the *current* mesh's shardings, so a checkpoint written on one mesh restores onto
any other.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from earthgptx_jax import paths


class NoUsableCheckpointError(RuntimeError):
  """Every checkpoint in the directory failed to restore."""


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
    import grain  # local: only training needs the data-iterator handler
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    if config is not None:
      items["config"] = ocp.args.JsonSave(json.loads(config.to_json()))
    return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

  def restore(self, step: int, abstract_state: Any, *, data_iter=None) -> Any:
    import grain
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
