"""Bad records: skipped, counted per reason (`schema.BAD_REASONS`), and fatal above a fraction.

`examples.ExampleProcessor` turns an unusable record into a `BadRecord` marker instead of an
example; `SkipBad` drops the markers (logging each) and attaches their counts to the next good
example; after batching, `BadRecordAccounting` sums the counts into running totals that live
in the iterator's checkpointed state, and raises `BadRecordFractionError` once more than
data.max_bad_fraction of the records read are bad.

Counts are vectors over `schema.BAD_REASONS`. New reasons are appended there, so the state of
an iterator saved before a reason existed (a shorter vector) restores with zeros for it.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import grain
import numpy as np

from data_pipelines import schema

_BAD_KEY = "_bad_records"  # [len(BAD_REASONS)] counts attached to examples until accounted


class BadRecordFractionError(RuntimeError):
  """More than data.max_bad_fraction of the records read so far were unusable."""


class BadRecord(NamedTuple):
  """What the pipeline carries in place of an unusable record's example."""
  reason: str  # one of schema.BAD_REASONS
  message: str  # names the record


class SkipBad(grain.IterDataset):
  """Drops `BadRecord` markers, logging each; their counts ride on the next good example."""

  def __iter__(self):
    return _SkipBadIterator(self._parent.__iter__())


class BadRecordAccounting(grain.IterDataset):
  """Sums the per-reason counts of every batch; aborts above the configured bad fraction."""

  def __init__(self, parent, max_bad_fraction: float, min_records: int):
    super().__init__(parent)
    self.max_bad_fraction = max_bad_fraction
    self.min_records = min_records

  def __iter__(self):
    return BatchIterator(self._parent.__iter__(), self.max_bad_fraction, self.min_records)


class BatchIterator(grain.DatasetIterator):
  """Yields numpy batch dicts (batch.py); `bad_records` / `good_records` are running totals
  of the records behind the batches delivered so far (bad ones ride on the next good one).

  It is its own checkpoint handle: `grain.checkpoint.CheckpointSave(it)`.
  """

  def __init__(self, parent, max_bad_fraction: float, min_records: int):
    super().__init__(parent)
    self.max_bad_fraction = max_bad_fraction
    self.min_records = min_records
    self.good_records = 0
    self.bad = np.zeros(len(schema.BAD_REASONS), np.int64)

  @property
  def bad_records(self) -> dict[str, int]:
    return {r: int(n) for r, n in zip(schema.BAD_REASONS, self.bad) if n}

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._parent)
    counts = batch.pop(_BAD_KEY)
    self.bad += counts.reshape(-1, len(schema.BAD_REASONS)).sum(0)
    self.good_records += len(batch["task_id"])
    num_bad = int(self.bad.sum())
    seen = num_bad + self.good_records
    if seen >= self.min_records and num_bad > self.max_bad_fraction * seen:
      raise BadRecordFractionError(
          f"{num_bad} of {seen} records were unusable ({num_bad / seen:.1%} > "
          f"data.max_bad_fraction={self.max_bad_fraction:.1%}); by reason: "
          f"{self.bad_records}. Fix or rebuild the data, or raise data.max_bad_fraction.")
    return batch

  def get_state(self):
    return {"parent": self._parent.get_state(), "good_records": self.good_records,
            "bad_records": self.bad.tolist()}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self.good_records = int(state["good_records"])
    self.bad = saved_counts(state["bad_records"])


def saved_counts(counts) -> np.ndarray:
  """Per-reason counts from a saved state -> [len(BAD_REASONS)] int64, zeros for the reasons
  added since it was saved."""
  counts = np.asarray(counts, np.int64).reshape(-1)
  if len(counts) > len(schema.BAD_REASONS):
    raise ValueError(f"bad-record counts: the saved state has {len(counts)} reasons, this code "
                     f"knows {len(schema.BAD_REASONS)} ({schema.BAD_REASONS}); it was written "
                     "by a newer version")
  return np.pad(counts, (0, len(schema.BAD_REASONS) - len(counts)))


class _SkipBadIterator(grain.DatasetIterator):

  def __init__(self, parent):
    super().__init__(parent)
    self._pending = np.zeros(len(schema.BAD_REASONS), np.int64)

  def __next__(self):
    while True:
      item = next(self._parent)
      if isinstance(item, BadRecord):
        logging.warning("skipping bad record (%s): %s", item.reason, item.message)
        self._pending[schema.BAD_REASONS.index(item.reason)] += 1
        continue
      item[_BAD_KEY] = self._pending
      self._pending = np.zeros_like(self._pending)
      return item

  def get_state(self):
    return {"parent": self._parent.get_state(), "pending": self._pending.tolist()}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._pending = saved_counts(state["pending"])
