"""The training loop: one-stage fusion training of EarthGPT-X, sharded, checkpointed, resumable,
multi-host; evaluated along the way and at the end.

Everything a run depends on is in the config; it is saved beside every checkpoint with the run's
tokenizer. Training resumes from the newest usable checkpoint in the workdir. SIGTERM (TPU
maintenance / preemption) saves a checkpoint and returns.
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
from absl import logging
from etils import epath

from data_pipelines import pipeline, tokenizer_training
from earthgptx_jax import checkpointing, evaluation, perf, pretrained, trainer, workdir_lock
from earthgptx_jax import progress as progress_lib
from earthgptx_jax import tokenizer as tokenizer_lib


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
  tokenizer = tokenizer_training.ensure_tokenizer(config)
  config = tokenizer_lib.complete_config(config, tokenizer)  # vocab size and special token ids
  data = pipeline.prepare(config, tokenizer)  # ensures the data; checks the model's slots
  config = pretrained.resolve_config(config, log=_log)  # before the model: e.g. SAM's sizes
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
    state = state.replace(trainable=dict(
        state.trainable, params=pretrained.load_into(state.params, config, log=_log)))
    _log(f"initialised a new run in {workdir} (mesh {dict(mesh.shape)})")
  else:
    step, state = restored
    _log(f"resumed from step {step} in {workdir} (mesh {dict(mesh.shape)})")
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    save_tokenizer(data.tokenizer, workdir / "tokenizer")

  num_tasks = len(data.task_names)
  train_step = trainer.make_train_step(model, optimizer, config, mesh, state_sh, num_tasks)
  first = trainer.global_batch(next(train_iter), config, mesh)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh), trainer.nn.logical_axis_rules(trainer.sharding.LOGICAL_AXIS_RULES):
    compiled = train_step.jitted.lower(state, first).compile()
  _log(f"train step compiled in {time.perf_counter() - t0:.1f} s")
  trainer.sharding.wait_for_all_processes("train step compiled")
  peak = config.train.get("peak_flops", None) or perf.measured_matmul_peak()
  progress = progress_lib.ProgressLogger(workdir, config, data.task_names,
                                         perf.compiled_flops(compiled), peak)
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
      eval_metrics = evaluation.evaluate_params(trainer.model_params(state.trainable, config),
                                              config, data, mesh=mesh,
                                              max_examples=config.train.get("eval_examples"))
      progress.write_eval(step, eval_metrics)
      _log("eval " + evaluation.format_summary(eval_metrics))
    stop = preemption.requested or ckpt.reached_preemption(step)
    if step % int(config.checkpoint.every_steps) == 0 or step == total_steps or stop:
      ckpt.save(step, state, data_iter=train_iter, config=config,
                metrics=best_metric(config, eval_metrics), force=stop)
    if stop:
      ckpt.wait()
      _log(f"preemption requested: checkpoint at step {step} written; exiting")
      ckpt.close()
      return {"step": step, "preempted": True, **last}
    if step < total_steps:
      batch = trainer.global_batch(next(train_iter), config, mesh)
  ckpt.wait()
  final = evaluation.evaluate_params(trainer.model_params(state.trainable, config), config, data,
                                   mesh=mesh,
                                   max_examples=config.train.get("eval_examples"))
  progress.write_eval(step, final)
  _log("final eval " + evaluation.format_summary(final))
  result = {"step": step, **last, **{f"eval/{k}": v for k, v in final.items()}}
  if jax.process_index() == 0:
    (workdir / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
  ckpt.close()
  return result


def save_tokenizer(tokenizer, folder: epath.Path) -> None:
  """The run's tokenizer beside its checkpoints, so inference needs nothing but the workdir.
  Written locally then copied, since tokenizers cannot write to gs:// themselves."""
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer.save_pretrained(tmp)
    folder.mkdir(parents=True, exist_ok=True)
    for file in pathlib.Path(tmp).iterdir():
      (folder / file.name).write_bytes(file.read_bytes())


def best_metric(config, eval_metrics) -> dict[str, float] | None:
  """{config.checkpoint.best_metric: value} from an evaluation, for the checkpointer to keep the
  best step by; None without that metric."""
  name = config.checkpoint.get("best_metric", None)
  if not name or not eval_metrics or name not in eval_metrics:
    return None
  return {name: float(eval_metrics[name])}


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)
  logging.info(message)
