r"""One-stage fusion training of EarthGPT-X: sharded, checkpointed, resumable, multi-host.

  python -m earthgptx_jax.train --config=configs/fusion.py:tiny --workdir=/tmp/egx_tiny

Everything a run depends on is in the config; it is saved beside every checkpoint. Re-running
the same command resumes from the newest usable checkpoint in `--workdir` (local path or
gs://). SIGTERM (TPU maintenance / preemption) saves a checkpoint and exits 0.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import signal
import sys
import tempfile
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from earthgptx_jax import checkpointing, paths, perf, trainer, workdir_lock

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/fusion.py:tiny",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (or gs:// path) for checkpoints, "
                               "TensorBoard events and metrics.")
_BREAK_LOCK = flags.DEFINE_bool("break_lock", False, "Take over --workdir's train.lock left by a "
                                "job on another host that is gone (see workdir_lock.py).")


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """`jax.distributed.initialize` from config.distributed, or auto-detected on TPU/SLURM."""
  dist = config.get("distributed", None)
  if dist is None or not dist.get("enabled", False):
    return
  kwargs = {k: dist.get(k) for k in ("coordinator_address", "num_processes", "process_id")
            if dist.get(k, None) is not None}
  if dist.get("local_device_ids", None) is not None:
    kwargs["local_device_ids"] = list(dist.local_device_ids)
  jax.distributed.initialize(**kwargs)
  logging.info("distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


class PreemptionFlag:
  """Set by SIGTERM; the loop checks it between steps, saves, and exits cleanly."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True


class ProgressLogger:
  """One console line per log interval plus TensorBoard scalars (process 0 only)."""

  def __init__(self, workdir: epath.Path, config, task_names, flops_per_step, peak_flops):
    self.workdir = workdir
    self.total_steps = int(config.train.steps)
    self.task_names = task_names
    self.flops_per_step = flops_per_step
    self.peak_flops = peak_flops
    self.box_head = bool(config.model.box.head)
    self.writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(str(workdir / "tensorboard"))
    self._t0 = time.perf_counter()
    self._steps = 0
    self._examples = 0
    self._tokens = 0
    self._sums: dict[str, float] = {}
    self._task_ce = np.zeros(len(task_names))
    self._task_tokens = np.zeros(len(task_names))

  def update(self, metrics: dict, examples: int, tokens: int):
    self._steps += 1
    self._examples += examples
    self._tokens += tokens
    for k in ("loss", "ce", "mask_bce", "mask_dice", "box_l1", "box_giou", "box_cell",
              "grad_norm"):
      self._sums[k] = self._sums.get(k, 0.0) + float(metrics[k])
    self._sums["skipped"] = self._sums.get("skipped", 0.0) + float(metrics["update_skipped"])
    self._task_ce += np.asarray(metrics["task_ce_sum"])
    self._task_tokens += np.asarray(metrics["task_tokens"])
    self._lr = float(metrics["learning_rate"])

  def flush(self, step: int) -> dict[str, float]:
    elapsed = max(time.perf_counter() - self._t0, 1e-9)
    out = {k: v / self._steps for k, v in self._sums.items() if k != "skipped"}
    out["skipped_updates"] = self._sums.get("skipped", 0.0)
    out["examples_per_s"] = self._examples / elapsed
    out["tokens_per_s"] = self._tokens / elapsed
    out["learning_rate"] = self._lr
    step_time = elapsed / self._steps
    if self.flops_per_step and self.peak_flops:
      out["mfu"] = self.flops_per_step / step_time / self.peak_flops
    task_loss = {name: self._task_ce[i] / self._task_tokens[i]
                 for i, name in enumerate(self.task_names) if self._task_tokens[i] > 0}
    eta = step_time * (self.total_steps - step)
    line = (f"step {step}/{self.total_steps} loss {out['loss']:.4f} (ce {out['ce']:.3f} "
            f"bce {out['mask_bce']:.3f} dice {out['mask_dice']:.3f}"
            + (f" box l1 {out['box_l1']:.3f} giou {out['box_giou']:.3f} cell "
               f"{out['box_cell']:.3f}" if self.box_head else "")
            + ") | "
            + " ".join(f"{k} {v:.3f}" for k, v in task_loss.items())
            + f" | {out['tokens_per_s']:.0f} tok/s {out['examples_per_s']:.1f} ex/s"
            + (f" MFU {100 * out['mfu']:.1f}%" if "mfu" in out else "")
            + f" | ETA {eta / 60:.1f} min")
    if out["skipped_updates"]:
      line += f" | {int(out['skipped_updates'])} update(s) skipped: non-finite loss/grads"
    if jax.process_index() == 0:
      print(line, flush=True)
    if jax.process_index() == 0:
      with (self.workdir / "train_log.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, **out, **{f"task_ce/{k}": v
                                                    for k, v in task_loss.items()}}) + "\n")
    if self.writer is not None:
      for k, v in out.items():
        self.writer.add_scalar(f"train/{k}", v, step)
      for k, v in task_loss.items():
        self.writer.add_scalar(f"train_task_ce/{k}", v, step)
      self.writer.flush()
    self._t0 = time.perf_counter()
    self._steps = self._examples = self._tokens = 0
    self._sums = {}
    self._task_ce[:] = 0
    self._task_tokens[:] = 0
    return dict(out, **{f"task_ce/{k}": v for k, v in task_loss.items()})

  def write_eval(self, step: int, metrics: dict[str, float]):
    if self.writer is not None:
      for k, v in metrics.items():
        self.writer.add_scalar(f"eval/{k}", v, step)
      self.writer.flush()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       break_lock: bool = False) -> dict[str, Any]:
  """Trains (resuming if possible) to `config.train.steps`; returns the final metrics."""
  initialize_distributed(config)
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  # One owner per workdir, taken before any data preparation or compile (workdir_lock.py).
  lock = (workdir_lock.WorkdirLock(workdir, break_lock=break_lock, log=_log)
          if jax.process_index() == 0 else contextlib.nullcontext())
  with lock:
    if jax.process_index() == 0:  # after the lock: a refused second trainer writes nothing
      checkpointing.check_writable(workdir)
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict[str, Any]:
  from data_pipelines import loader  # local: keeps `--help` fast
  from earthgptx_jax import evaluate

  data = loader.prepare(config)  # ensures data + tokenizer; fills vocab size and token ids
  config = data.config
  from earthgptx_jax import pretrained as pretrained_lib  # before the model: e.g. SAM's sizes
  config = pretrained_lib.resolve_config(config, log=_log)
  mesh = trainer.sharding.make_mesh(config.mesh.shape)
  model = trainer.build_model(config)
  optimizer = trainer.make_optimizer(config, model)
  abstract_state, state_sh = trainer.state_shardings(model, optimizer, config, mesh)
  train_iter = data.train_iterator(jax.process_index(), jax.process_count())

  ckpt = checkpointing.Checkpointer(workdir / "checkpoints", config.checkpoint)
  restored = ckpt.restore_latest(checkpointing.abstract_with_shardings(abstract_state, state_sh),
                                 data_iter=train_iter, log=_log)
  if restored is None:
    state, _ = trainer.create_state(model, optimizer, config, mesh,
                                    jax.random.key(int(config.seed)))
    from earthgptx_jax import pretrained
    state = state.replace(trainable=dict(
        state.trainable, params=pretrained.load_into(state.params, config, log=_log)))
    _log(f"initialised a new run in {workdir} (mesh {dict(mesh.shape)})")
  else:
    step, state = restored
    _log(f"resumed from step {step} in {workdir} (mesh {dict(mesh.shape)})")
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    _save_tokenizer(data.tokenizer, workdir / "tokenizer")

  num_tasks = len(data.task_names)
  train_step = trainer.make_train_step(model, optimizer, config, mesh, state_sh, num_tasks)
  first = trainer.global_batch(next(train_iter), config, mesh)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh), trainer.nn.logical_axis_rules(trainer.sharding.LOGICAL_AXIS_RULES):
    compiled = train_step.jitted.lower(state, first).compile()
  _log(f"train step compiled in {time.perf_counter() - t0:.1f} s")
  trainer.sharding.wait_for_all_processes("train step compiled")
  peak = config.train.get("peak_flops", None) or perf.measured_matmul_peak()
  progress = ProgressLogger(workdir, config, data.task_names, perf.compiled_flops(compiled), peak)
  preemption = PreemptionFlag()

  total_steps = int(config.train.steps)
  step = int(state.step)
  alignment_steps = int(config.train.get("alignment_steps", 0) or 0)
  if step < alignment_steps:
    _log(f"alignment stage: steps {step + 1}-{alignment_steps} train on "
         f"{', '.join(config.data.alignment_tasks)} only, then on the whole mixture")
  last = {}
  batch = first
  while step < total_steps:
    ckpt.check()  # a failed async save stops the run here, not at the next save
    state, metrics = train_step(state, batch)
    step += 1
    progress.update(metrics, examples=int(config.train.batch_size),
                    tokens=int(np.sum(np.asarray(jax.device_get(batch["attention_mask"])))))
    if step % int(config.train.log_every_steps) == 0 or step == total_steps:
      last = progress.flush(step)
    eval_every = int(config.train.get("eval_every_steps", 0) or 0)
    eval_metrics = None
    if eval_every and step % eval_every == 0 and step < total_steps:
      eval_metrics = evaluate.evaluate_params(trainer.model_params(state.trainable, config),
                                              config, data, mesh=mesh,
                                              max_examples=config.train.get("eval_examples"))
      progress.write_eval(step, eval_metrics)
      _log("eval " + evaluate.format_summary(eval_metrics))
    stop = preemption.requested or ckpt.reached_preemption(step)
    if step % int(config.checkpoint.every_steps) == 0 or step == total_steps or stop:
      ckpt.save(step, state, data_iter=train_iter, config=config,
                metrics=_best_metric(config, eval_metrics), force=stop)
    if stop:
      ckpt.wait()
      _log(f"preemption requested: checkpoint at step {step} written; exiting")
      ckpt.close()
      return {"step": step, "preempted": True, **last}
    if step < total_steps:
      batch = trainer.global_batch(next(train_iter), config, mesh)
  ckpt.wait()
  final = evaluate.evaluate_params(trainer.model_params(state.trainable, config), config, data,
                                   mesh=mesh,
                                   max_examples=config.train.get("eval_examples"))
  progress.write_eval(step, final)
  _log("final eval " + evaluate.format_summary(final))
  result = {"step": step, **last, **{f"eval/{k}": v for k, v in final.items()}}
  if jax.process_index() == 0:
    (workdir / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
  ckpt.close()
  return result


def _save_tokenizer(tokenizer, folder: epath.Path) -> None:
  """The run's tokenizer beside its checkpoints, so inference needs nothing but the workdir.
  Written locally then copied, since tokenizers cannot write to gs:// themselves."""
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer.save_pretrained(tmp)
    folder.mkdir(parents=True, exist_ok=True)
    for file in pathlib.Path(tmp).iterdir():
      (folder / file.name).write_bytes(file.read_bytes())


def _best_metric(config, eval_metrics):
  name = config.checkpoint.get("best_metric", None)
  if not name or not eval_metrics or name not in eval_metrics:
    return None
  return {name: float(eval_metrics[name])}


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)
  logging.info(message)


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
  train_and_evaluate(_CONFIG.value, _WORKDIR.value, break_lock=_BREAK_LOCK.value)


if __name__ == "__main__":
  app.run(main)
