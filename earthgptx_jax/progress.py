"""Training progress: one console line per log interval, train_log.jsonl and TensorBoard scalars
(process 0 only).

After a resume the log equals the uninterrupted run's: the same entries at the same steps with
the same loss figures (wall-clock figures, tok/s, ex/s, MFU, ETA, are measured anew). Two things
make it so:
  - On start, entries past the restored step, written by a run killed (SIGKILL, a crash) after
    its last checkpoint, are dropped: train_log.jsonl is rewritten without them (a temporary
    file renamed over it) and TensorBoard is opened with `purge_step`, which hides the stale
    events of those steps.
  - A log interval cut by a checkpoint save that is not at an interval boundary (a SIGTERM at
    step 15 with log_every_steps=10) is not flushed as an entry of its own: its partial sums
    (`state_dict`) are saved beside the checkpoint, `<workdir>/progress/<step>.json`, and the
    resumed run continues them, so its entry at step 20 averages steps 11-20 as the
    uninterrupted run's does. A checkpoint without that file (older runs) resumes with an empty
    interval, and a line says the next entry averages fewer steps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping

import jax
import numpy as np
import tensorboardX
from etils import epath

LOG_NAME = "train_log.jsonl"
STATE_DIR = "progress"  # <workdir>/progress/<step>.json: partial interval sums per checkpoint


class ProgressLogger:
  """One console line per log interval plus TensorBoard scalars (process 0 only).

  `start_step`: the step the run starts from (restored, or 0); log entries and TensorBoard
  events past it are dropped (see the module docstring).
  """

  def __init__(self, workdir: epath.Path, config, task_names, flops_per_step, peak_flops, *,
               start_step: int = 0):
    self.workdir = workdir
    self.total_steps = int(config.train.steps)
    self.task_names = task_names
    self.flops_per_step = flops_per_step
    self.peak_flops = peak_flops
    # The train step logs each loss term under its config.loss name; the answer CE reads first.
    self.loss_terms = tuple(sorted(config.loss.keys(), key=lambda name: (name != "ce", name)))
    self.writer = None
    if jax.process_index() == 0:
      truncate_log(workdir / LOG_NAME, start_step)
      # TensorBoard hides the events at steps >= purge_step written before this one.
      self.writer = tensorboardX.SummaryWriter(str(workdir / "tensorboard"),
                                               purge_step=start_step + 1)
    self._reset()

  def _reset(self):
    self._t0 = time.perf_counter()
    self._elapsed = 0.0  # seconds of this interval spent before a resume
    self._steps = 0
    self._examples = 0
    self._tokens = 0
    self._sums: dict[str, float] = {}
    self._task_ce = np.zeros(len(self.task_names))
    self._task_tokens = np.zeros(len(self.task_names))
    self._lr = float("nan")
    self._pending: list[tuple[dict, int]] = []  # steps not yet read from the device

  def update(self, metrics: dict, examples: int):
    """Adds one step. Its metrics may be device arrays still being computed: they are only
    read at the next `flush` or `state_dict`, all at once, so the host never waits for a step
    here (it dispatches the next one). Its tokens are `metrics["tokens"]`: the train step sums
    the global batch's attention mask on device, so every process gets the global count."""
    self._pending.append((metrics, examples))

  def _drain(self) -> None:
    """Reads the pending steps' metrics (one transfer, waiting for the last step) and adds them
    in step order, in float64 as they come: the sums do not depend on when they were read."""
    pending, self._pending = jax.device_get(self._pending), []
    for metrics, examples in pending:
      self._add(metrics, examples)

  def _add(self, metrics: dict, examples: int):
    self._steps += 1
    self._examples += examples
    self._tokens += int(metrics["tokens"])
    for k in ("loss", *self.loss_terms, "grad_norm"):
      self._sums[k] = self._sums.get(k, 0.0) + float(metrics[k])
    self._sums["skipped"] = self._sums.get("skipped", 0.0) + float(metrics["update_skipped"])
    self._task_ce += np.asarray(metrics["task_ce_sum"])
    self._task_tokens += np.asarray(metrics["task_tokens"])
    self._lr = float(metrics["learning_rate"])

  def flush(self, step: int, bad_records: Mapping[str, int] | None = None) -> dict[str, float]:
    """Writes the entry of the interval ending at `step`. `bad_records`: running per-reason
    totals of skipped records (all processes), shown and logged when non-zero."""
    self._drain()
    elapsed = max(self._elapsed + time.perf_counter() - self._t0, 1e-9)
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
    bad = {k: int(v) for k, v in (bad_records or {}).items() if v}
    eta = step_time * (self.total_steps - step)
    terms = " ".join(f"{k} {out[k]:.3f}" for k in self.loss_terms)
    line = (f"step {step}/{self.total_steps} loss {out['loss']:.4f} ({terms}) | answer CE: "
            + " ".join(f"{k} {v:.3f}" for k, v in task_loss.items())
            + f" | {out['tokens_per_s']:.0f} tok/s {out['examples_per_s']:.1f} ex/s"
            + (f" MFU {100 * out['mfu']:.1f}%" if "mfu" in out else "")
            + f" | ETA {eta / 60:.1f} min")
    if out["skipped_updates"]:
      line += f" | {int(out['skipped_updates'])} update(s) skipped: non-finite loss/grads"
    if bad:
      line += " | bad records skipped: " + " ".join(f"{k} {v}" for k, v in bad.items())
    entry = dict(out, **{f"task_ce/{k}": v for k, v in task_loss.items()},
                 **{f"bad_records/{k}": v for k, v in bad.items()})
    if jax.process_index() == 0:
      print(line, flush=True)
      with (self.workdir / LOG_NAME).open("a") as f:
        f.write(json.dumps({"step": step, **entry}) + "\n")
    if self.writer is not None:
      for k, v in out.items():
        self.writer.add_scalar(f"train/{k}", v, step)
      for k, v in task_loss.items():
        self.writer.add_scalar(f"train_task_ce/{k}", v, step)
      for k, v in bad.items():
        self.writer.add_scalar(f"bad_records/{k}", v, step)
      self.writer.flush()
    self._reset()
    return entry

  def write_eval(self, step: int, metrics: dict[str, float]):
    if self.writer is not None:
      for k, v in metrics.items():
        self.writer.add_scalar(f"eval/{k}", v, step)
      self.writer.flush()

  def state_dict(self) -> dict:
    """The unlogged part of the current interval, JSON-able (saved beside a checkpoint)."""
    self._drain()
    return {"steps": self._steps, "examples": self._examples, "tokens": self._tokens,
            "elapsed_s": self._elapsed + time.perf_counter() - self._t0, "sums": self._sums,
            "task_ce": self._task_ce.tolist(), "task_tokens": self._task_tokens.tolist(),
            "learning_rate": self._lr, "task_names": list(self.task_names)}

  def load_state_dict(self, state: Mapping) -> None:
    if list(state["task_names"]) != list(self.task_names):
      raise ValueError(f"progress state: tasks {state['task_names']} != {self.task_names}")
    self._reset()
    self._steps, self._examples = int(state["steps"]), int(state["examples"])
    self._tokens, self._elapsed = int(state["tokens"]), float(state["elapsed_s"])
    self._sums = {k: float(v) for k, v in state["sums"].items()}
    self._task_ce = np.asarray(state["task_ce"], np.float64)
    self._task_tokens = np.asarray(state["task_tokens"], np.float64)
    self._lr = float(state["learning_rate"])

  def save_state(self, step: int, keep_steps) -> None:
    """Process 0 writes the partial interval for the checkpoint of `step` (before that
    checkpoint is saved, so a finalised checkpoint always has it) and removes the files of
    checkpoints that are gone (not in `keep_steps`)."""
    if jax.process_index() != 0:
      return
    folder = self.workdir / STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    keep = {int(s) for s in keep_steps} | {step}
    for path in folder.glob("*.json"):
      if path.stem.isdigit() and int(path.stem) not in keep:
        path.unlink()
    _write_atomic(folder / f"{step}.json", json.dumps(self.state_dict()))

  def restore_state(self, step: int, log: Callable[[str], None]) -> None:
    """Continues the interval saved with the checkpoint of `step` (nothing to do at step 0)."""
    if step == 0:
      return
    path = self.workdir / STATE_DIR / f"{step}.json"
    try:
      self.load_state_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError) as e:
      log(f"{path}: the log interval cut at step {step} cannot be continued "
          f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); the next log entry averages "
          "only the steps after the resume")


def truncate_log(path: epath.Path, last_step: int) -> None:
  """Drops the entries of train_log.jsonl past `last_step` (and a line cut short by a kill);
  atomic: a temporary file renamed over the log."""
  if not path.exists():
    return
  lines = path.read_text().splitlines()
  kept = []
  for line in lines:
    try:
      if int(json.loads(line)["step"]) <= last_step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      continue
  if kept != lines:
    _write_atomic(path, "".join(line + "\n" for line in kept))


def _write_atomic(path: epath.Path, text: str) -> None:
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_text(text)
  tmp.replace(path)
