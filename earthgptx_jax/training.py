"""The training loop: one-stage fusion training of EarthGPT-X, sharded, checkpointed, resumable,
multi-host; evaluated along the way and at the end.

Everything a run depends on is in the config; it is saved beside every checkpoint with the run's
tokenizer. Training resumes from the newest usable checkpoint in the workdir. SIGTERM (TPU
maintenance / preemption) saves a checkpoint and returns; before the first step, when there is
nothing to save, it stops data preparation or compilation at once.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import signal
import sys
import tempfile
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from data_pipelines import pipeline, schema, tokenizer_training
from earthgptx_jax import (checkpointing, evaluation, input_feed, perf, pretrained, trainer,
                           workdir_lock)
from earthgptx_jax import progress as progress_lib
from earthgptx_jax import tokenizer as tokenizer_lib
from earthgptx_jax.models import earthgptx


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
  if (jax.process_count() > 1 and jax.default_backend() == "cpu"
      and jax.config.jax_compilation_cache_dir):
    # jaxlib 0.10.2: a multi-process CPU train step loaded back from the persistent cache
    # segfaults in process 0 (the second run of the same job; reproduced with two local
    # processes). Compiling again costs a minute; a crash costs the run.
    jax.config.update("jax_compilation_cache_dir", None)
    logging.warning("compilation cache off: %d CPU processes do not load cached programs",
                    jax.process_count())
  logging.info("distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


class Preempted(BaseException):
  """SIGTERM during a phase with nothing to save: unwinds it at once. A BaseException, so that no
  `except Exception` on the way (e.g. a checkpoint fallback) takes it for a failure."""

  def __init__(self, phase: str, saved: str):
    super().__init__(f"SIGTERM while {phase}: {saved}")


class PreemptionFlag:
  """Set by SIGTERM, installed before anything else runs. The loop checks it between steps,
  saves, and exits cleanly; during an `interruptible` phase (data preparation, compilation,
  final evaluation: nothing unsaved) the handler raises `Preempted` at once instead.

  With several processes there is no handler here: `jax.distributed.initialize` installed the
  preemption service's, which tells every process to stop at the same step
  (`Checkpointer.reached_preemption`). Replacing it would make each process stop at its own
  step and save alone, or leave the others waiting at the next barrier.
  """

  def __init__(self):
    self.requested = False
    self._phase: tuple[str, str] | None = None
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, self._handle)

  def interruptible(self, phase: str | None, saved: str = "") -> None:
    """From now on a SIGTERM stops `phase` at once, reporting `saved` (None: it only sets the
    flag). Raises Preempted if one already came."""
    self._phase = (phase, saved) if phase and jax.process_count() == 1 else None
    if self.requested and self._phase:
      raise Preempted(*self._phase)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True
    if self._phase:
      phase, self._phase = self._phase, None
      raise Preempted(*phase)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       break_lock: bool = False) -> dict[str, Any]:
  """Trains (resuming if possible) to `config.train.steps`; returns the final metrics."""
  initialize_distributed(config)
  preemption = PreemptionFlag()  # first: a SIGTERM during data preparation or compile is handled
  # Before the workdir exists: a bad setting leaves nothing.
  pipeline.check_config(config)
  earthgptx.check_config(config.model)
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  # One owner per workdir, taken before any data preparation or compile (workdir_lock.py).
  lock = (workdir_lock.WorkdirLock(workdir, break_lock=break_lock, log=_log)
          if jax.process_index() == 0 else contextlib.nullcontext())
  try:
    with lock:
      if jax.process_index() == 0:  # after the lock: a refused second trainer writes nothing
        checkpointing.check_writable(workdir)
      return _train_and_evaluate(config, workdir, preemption)
  except Preempted as e:
    _log(f"{e}; exiting")
    return {"preempted": True}


def _nothing_saved(workdir: epath.Path, restored_step: int | None = None) -> str:
  """What a SIGTERM before the first step leaves: `restored_step` once a checkpoint restored."""
  if restored_step is None:
    steps = checkpointing.finalised_steps(workdir / "checkpoints")
    restored_step = steps[-1] if steps else 0
  return ("nothing to save (no step trained yet); the next run "
          + (f"resumes from the checkpoint at step {restored_step}" if restored_step else
             "starts from scratch (no checkpoint)"))


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.Path,
                        preemption: PreemptionFlag) -> dict[str, Any]:
  preemption.interruptible("preparing the data", _nothing_saved(workdir))
  tokenizer = tokenizer_training.ensure_tokenizer(config)
  config = tokenizer_lib.complete_config(config, tokenizer)  # vocab size and special token ids
  data = pipeline.prepare(config, tokenizer)  # ensures the data; checks the model's slots
  config = pretrained.resolve_config(config, log=_log)  # before the model: e.g. SAM's sizes
  mesh = trainer.sharding.make_mesh(config.mesh.shape,
                                    dcn_shape=config.mesh.get("dcn_shape", None))
  model = trainer.build_model(config)
  optimizer = trainer.make_optimizer(config, model)
  abstract_state, state_sh = trainer.state_shardings(model, optimizer, config, mesh)
  shards = input_feed.data_shards(config, mesh)  # the rows this process's devices hold
  train_iter = input_feed.train_iterator(data, shards)

  preemption.interruptible(None)  # restoring (a fallback moves checkpoints) runs to its end
  ckpt = checkpointing.Checkpointer(workdir / "checkpoints", config.checkpoint)
  restored = ckpt.restore_latest(checkpointing.abstract_with_shardings(abstract_state, state_sh),
                                 data_iter=train_iter, log=_log)
  preemption.interruptible("initialising the model",
                           _nothing_saved(workdir, restored[0] if restored else 0))
  if restored is None:
    state, _ = trainer.create_state(model, optimizer, config, mesh,
                                    jax.random.key(int(config.seed)))
    state = state.replace(trainable=dict(
        state.trainable, params=pretrained.load_into(state.params, config, log=_log)))
    _log(f"initialised a new run in {workdir} (mesh {dict(mesh.shape)})")
  else:
    step, state = restored
    _log(f"resumed from step {step} in {workdir} (mesh {dict(mesh.shape)})")
  preemption.interruptible(None)  # config.json and the tokenizer are written whole
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    save_tokenizer(data.tokenizer, workdir / "tokenizer")
  preemption.interruptible("compiling the train step",
                           _nothing_saved(workdir, restored[0] if restored else 0))

  num_tasks = len(data.task_names)
  train_step = trainer.make_train_step(model, optimizer, config, mesh, state_sh, num_tasks)
  step = int(state.step)
  total_steps = int(config.train.steps)
  # Batches are loaded and put on device in a thread from now on, during the compile too.
  batches = input_feed.Prefetcher(train_iter, lambda local: trainer.global_batch(
      local, config, mesh), limit=max(total_steps - step, 0))
  try:
    return _train_loop(config, workdir, preemption, data, mesh, state, train_step, batches,
                       shards, ckpt)
  finally:
    batches.close()


def _train_loop(config, workdir, preemption, data, mesh, state, train_step, batches, shards,
                ckpt) -> dict[str, Any]:
  t0 = time.perf_counter()
  _log("compiling the train step")
  with jax.set_mesh(mesh), trainer.nn.logical_axis_rules(trainer.sharding.LOGICAL_AXIS_RULES):
    lowered = train_step.jitted.lower(state, abstract_batch(config, mesh))
  compiled = _compile_interruptibly(lowered)
  _log(f"train step compiled in {time.perf_counter() - t0:.1f} s")
  trainer.sharding.wait_for_all_processes("train step compiled")
  peak = config.train.get("peak_flops", None) or perf.measured_matmul_peak()
  preemption.interruptible(None)  # from here on a SIGTERM saves a checkpoint after the step
  step = int(state.step)
  progress = progress_lib.ProgressLogger(workdir, config, data.task_names,
                                         perf.model_flops_per_step(config), peak, start_step=step)
  progress.restore_state(step, log=_log)

  total_steps = int(config.train.steps)
  count_bad = shards.counts_bad_records
  alignment_steps = int(config.train.get("alignment_steps", 0) or 0)
  if step < alignment_steps:
    _log(f"alignment stage: steps {step + 1}-{alignment_steps} train on "
         f"{', '.join(config.data.alignment_tasks)} only, then on the whole mixture")
  last, previous = {}, None
  # Asynchronous: the step is dispatched and the host goes on (its metrics are read at the log
  # interval, the next batch is already on device), so the device never waits for the host.
  while step < total_steps:
    ckpt.check()  # a failed async save stops the run here, not at the next save
    state, metrics = compiled(state, next(batches))
    step += 1
    if previous is not None:  # at most two steps in flight: the host never runs far ahead,
      previous.block_until_ready()  # holding batches on device, yet one step is always queued
    previous = metrics["loss"]
    progress.update(metrics, examples=int(config.train.batch_size))
    if step % int(config.train.log_every_steps) == 0 or step == total_steps:
      last = progress.flush(step, bad_records=global_bad_records(batches.bad_records, count_bad))
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
      progress.save_state(step, keep_steps=ckpt.all_steps())  # the log interval's partial sums
      # The position after the batches taken, not after those waiting in the prefetch queue.
      ckpt.save(step, state, data_iter=batches.position(), config=config,
                metrics=best_metric(config, eval_metrics), force=stop)
    if stop:
      ckpt.wait()
      _log(f"preempted: checkpoint at step {step} written, with the data position and the log "
           "interval's partial sums; the next run resumes from it; exiting")
      ckpt.close()
      return {"step": step, "preempted": True, **last}
  ckpt.wait()
  preemption.interruptible("evaluating at the end", f"the checkpoint at step {step} is saved; "
                           "the next run repeats the final evaluation")
  final = evaluation.evaluate_params(trainer.model_params(state.trainable, config), config, data,
                                   mesh=mesh,
                                   max_examples=config.train.get("eval_examples"))
  preemption.interruptible(None)
  progress.write_eval(step, final)
  _log("final eval " + evaluation.format_summary(final))
  bad = {f"bad_records/{k}": v
         for k, v in global_bad_records(batches.bad_records, count_bad).items()}
  result = {"step": step, **last, **bad, **{f"eval/{k}": v for k, v in final.items()}}
  if jax.process_index() == 0:
    (workdir / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
  ckpt.close()
  return result


def _compile_interruptibly(lowered):
  """`lowered.compile()` in a daemon thread while the main thread waits in `join`, where a
  SIGTERM handler runs (it cannot run inside XLA's compile, which takes minutes)."""
  out = {}

  def work():
    try:
      out["compiled"] = lowered.compile()
    except BaseException as e:  # noqa: BLE001 — re-raised in the main thread
      out["error"] = e

  thread = threading.Thread(target=work, name="compile train step", daemon=True)
  thread.start()
  thread.join()
  if "error" in out:
    raise out["error"]
  return out["compiled"]


def global_bad_records(local: dict[str, int], counts: bool = True) -> dict[str, int]:
  """Per-reason totals of the records skipped so far by all processes, from each process's
  `local` totals; `counts`: False on a process that reads the same shards as another (its
  records are counted there)."""
  if jax.process_count() == 1:
    return local
  vector = np.asarray([local.get(r, 0) for r in schema.BAD_REASONS], np.int64) * int(counts)
  total = np.asarray(multihost_utils.process_allgather(vector)).reshape(-1, len(vector)).sum(0)
  return {r: int(n) for r, n in zip(schema.BAD_REASONS, total) if n}


def abstract_batch(config, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch's shapes, dtypes and shardings: the step compiles without a batch."""
  batch_size = int(config.train.batch_size)
  shardings = trainer.batch_shardings(config, mesh, batch_size)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[k])
          for k, (shape, dtype) in trainer.batch_lib.batch_shapes(config, batch_size).items()}


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
