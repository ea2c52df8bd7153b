"""The training loop's input: which rows of the global batch each process loads, and a thread
that loads and places the next batches on device while the current step runs.

Rows by devices: a process loads exactly the rows of the global batch that its devices hold
(`data_shards`). With the batch split over data x fsdp and those axes within hosts, that is one
block of B / processes rows per process; when an axis that does not split the batch (tensor)
spans hosts, several processes hold the same rows and must load the same examples, so they
read the same data shard. The data comes in `data.shards` shards (default: one per distinct
row block), each its own record stream; fixed, the global batches do not depend on the number
of processes (a single process loading every shard sees the same batches as a pod).

Prefetch: `Prefetcher` runs the data iterator and `make_array_from_process_local_data` in a
thread, a couple of batches ahead. The data position it reports (`position`, saved with a
checkpoint) is the iterator's state after the batches the loop has *taken*, never after the
ones still waiting in its queue, so a resume repeats no batch and skips none.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import queue
import threading
from collections.abc import Callable

import grain
import jax
import numpy as np

from earthgptx_jax import sharding


@dataclasses.dataclass(frozen=True)
class DataShards:
  """The train-data shards this process loads, in row order, out of `count`."""
  indices: tuple[int, ...]
  count: int
  # The first process holding these rows: its bad records are counted once in the totals.
  counts_bad_records: bool = True


def data_shards(config, mesh: jax.sharding.Mesh) -> DataShards:
  """The shards holding the rows of the global batch that this process's devices address."""
  batch_size = int(config.train.batch_size)
  rows: dict[int, set[int]] = collections.defaultdict(set)
  batch_sharding = sharding.batch_sharding(mesh, 1)
  for device, index in batch_sharding.devices_indices_map((batch_size,)).items():
    rows[device.process_index].update(range(batch_size)[index[0]])
  blocks = {}
  for process, held in rows.items():
    block = (min(held), max(held) + 1)
    if len(held) != block[1] - block[0]:
      raise sharding.MeshMismatchError(
          f"config.mesh.shape={tuple(mesh.shape.values())}: process {process}'s devices hold rows "
          f"{sorted(held)} of the batch, not one block; order the mesh so that each host's "
          "devices hold consecutive rows (README, Multi-host)")
    blocks[process] = block
  distinct = sorted(set(blocks.values()))
  size = distinct[0][1] - distinct[0][0]
  if any(b - a != size for a, b in distinct) or any(
      distinct[i][1] != distinct[i + 1][0] for i in range(len(distinct) - 1)):
    raise sharding.MeshMismatchError(
        f"config.mesh.shape={tuple(mesh.shape.values())}: the processes hold overlapping or "
        f"unequal row blocks {distinct} of the batch")
  count = config.data.get("shards", None) or len(distinct)
  if count % len(distinct) or batch_size % count:
    raise ValueError(f"data.shards: {count} must be a multiple of the {len(distinct)} row "
                     f"blocks the processes hold and divide train.batch_size={batch_size}")
  mine = blocks[jax.process_index()]
  per_block = count // len(distinct)
  first = distinct.index(mine) * per_block
  owner = min(p for p, block in blocks.items() if block == mine)
  return DataShards(tuple(range(first, first + per_block)), count,
                    counts_bad_records=owner == jax.process_index())


def train_iterator(data, shards: DataShards):
  """The iterator of this process's rows: its shards' batches concatenated in row order."""
  iterators = [data.train_iterator(i, shards.count) for i in shards.indices]
  return iterators[0] if len(iterators) == 1 else ShardsIterator(iterators)


class ShardsIterator(grain.DatasetIterator):
  """Several data shards' batches as one batch (rows in shard order); checkpointable."""

  def __init__(self, shards):
    super().__init__(list(shards))
    self._shards = list(shards)

  @property
  def bad_records(self) -> dict[str, int]:
    totals = collections.Counter()
    for shard in self._shards:
      totals.update(shard.bad_records)
    return dict(totals)

  def __next__(self) -> dict[str, np.ndarray]:
    batches = [next(shard) for shard in self._shards]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self):
    return {"shards": [shard.get_state() for shard in self._shards]}

  def set_state(self, state):
    for shard, s in zip(self._shards, state["shards"], strict=True):
      shard.set_state(s)


class Position:
  """A data position fixed when it was taken, for grain's checkpoint handler (which calls
  `get_state()` when Orbax gets to it, possibly after the iterator moved on)."""

  def __init__(self, state):
    self._text = json.dumps(state, indent=4)

  def get_state(self) -> bytes:
    return self._text.encode()


class Prefetcher:
  """The next `limit` global batches, `make_batch(next(iterator))` run `depth` ahead in a thread.

  An error of the iterator (e.g. too many bad records) is raised by `next` at the batch where
  it happened. `position()` / `bad_records`: the iterator's state / bad-record totals after the
  batches taken so far. Take the iterator's restored state before starting one.
  """

  def __init__(self, iterator, make_batch: Callable, limit: int, depth: int = 2):
    self._iterator, self._make_batch, self._limit = iterator, make_batch, limit
    self._state = iterator.get_state()
    self._taken = 0
    self.bad_records = dict(iterator.bad_records)
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._work, name="prefetch batches", daemon=True)
    self._thread.start()

  def _work(self):
    try:
      for _ in range(self._limit):
        if self._stop.is_set():
          return
        batch = self._make_batch(next(self._iterator))
        self._put((batch, self._iterator.get_state(), dict(self._iterator.bad_records)))
    except BaseException as e:  # noqa: BLE001 — raised in the loop, at this batch
      self._put(e)

  def _put(self, item) -> None:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def __iter__(self):
    return self

  def __next__(self):
    if self._taken == self._limit:
      raise StopIteration
    self._taken += 1
    item = self._queue.get()
    if isinstance(item, BaseException):
      raise item
    batch, self._state, self.bad_records = item
    return batch

  def position(self) -> Position:
    return Position(self._state)

  def close(self) -> None:
    """Stops the thread (after the batch it is loading, if any)."""
    self._stop.set()
    self._thread.join()
