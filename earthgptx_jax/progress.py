"""Training progress: one console line per log interval, train_log.jsonl and TensorBoard scalars
(process 0 only)."""

from __future__ import annotations

import json
import time

import jax
import numpy as np
import tensorboardX
from etils import epath


class ProgressLogger:
  """One console line per log interval plus TensorBoard scalars (process 0 only)."""

  def __init__(self, workdir: epath.Path, config, task_names, flops_per_step, peak_flops):
    self.workdir = workdir
    self.total_steps = int(config.train.steps)
    self.task_names = task_names
    self.flops_per_step = flops_per_step
    self.peak_flops = peak_flops
    # The train step logs each loss term under its config.loss name; the answer CE reads first.
    self.loss_terms = tuple(sorted(config.loss.keys(), key=lambda name: (name != "ce", name)))
    self.writer = None
    if jax.process_index() == 0:
      self.writer = tensorboardX.SummaryWriter(str(workdir / "tensorboard"))
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
    for k in ("loss", *self.loss_terms, "grad_norm"):
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
    terms = " ".join(f"{k} {out[k]:.3f}" for k in self.loss_terms)
    line = (f"step {step}/{self.total_steps} loss {out['loss']:.4f} ({terms}) | answer CE: "
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
