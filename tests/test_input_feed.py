"""The loop's input: a prefetched batch does not move the saved data position, errors come at
their batch, and each process loads the rows its devices hold (input_feed.py)."""

import json

import grain
import numpy as np
import pytest
from ml_collections import ConfigDict

from earthgptx_jax import input_feed, sharding, trainer


class _Counter(grain.DatasetIterator):
  """Yields {"x": [i]}; fails at `fail_at`; one bad record per batch."""

  def __init__(self, fail_at=None):
    super().__init__()
    self.i, self.fail_at = 0, fail_at

  @property
  def bad_records(self):
    return {"corrupt_image": self.i}

  def __next__(self):
    if self.i == self.fail_at:
      raise ValueError(f"bad batch {self.i}")
    self.i += 1
    return {"x": np.array([self.i])}

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


def test_the_position_is_after_the_batches_taken_not_the_prefetched_ones():
  it = _Counter()
  batches = input_feed.Prefetcher(it, lambda b: b, limit=10, depth=3)
  try:
    assert json.loads(batches.position().get_state()) == {"i": 0}
    assert int(next(batches)["x"][0]) == 1
    assert int(next(batches)["x"][0]) == 2
    position = batches.position()
    while it.i < 5:  # the thread has loaded batches 3..5 ahead
      pass
    assert json.loads(position.get_state()) == {"i": 2}
    assert json.loads(batches.position().get_state()) == {"i": 2}
    assert batches.bad_records == {"corrupt_image": 2}
  finally:
    batches.close()


def test_an_iterator_error_is_raised_at_its_batch_and_the_limit_is_kept():
  batches = input_feed.Prefetcher(_Counter(fail_at=2), lambda b: b, limit=5)
  try:
    assert [int(next(batches)["x"][0]) for _ in range(2)] == [1, 2]
    with pytest.raises(ValueError, match="bad batch 2"):
      next(batches)
  finally:
    batches.close()
  limited = input_feed.Prefetcher(_Counter(), lambda b: b, limit=2)
  assert len(list(limited)) == 2
  limited.close()


def test_shards_iterator_concatenates_rows_and_checkpoints_every_shard():
  a, b = _Counter(), _Counter()
  b.i = 100
  both = input_feed.ShardsIterator([a, b])
  assert next(both)["x"].tolist() == [1, 101]
  state = both.get_state()
  next(both)
  both.set_state(state)
  assert next(both)["x"].tolist() == [2, 102]
  assert both.bad_records == {"corrupt_image": 104}


def _config(batch_size=8, shards=None):
  return ConfigDict({"train": {"batch_size": batch_size}, "data": {"shards": shards}})


def test_one_process_holds_every_row_and_loads_the_configured_shards():
  mesh = sharding.make_mesh((1, -1, 1))
  assert input_feed.data_shards(_config(), mesh) == input_feed.DataShards((0,), 1, True)
  assert input_feed.data_shards(_config(shards=2), mesh) == input_feed.DataShards((0, 1), 2, True)
  with pytest.raises(ValueError, match="data.shards: 3"):
    input_feed.data_shards(_config(shards=3), mesh)


def test_a_local_batch_smaller_than_the_rows_the_devices_hold_raises():
  # Before global_shape was given, 4 rows became a silent global batch of 4 (issue 25 item 3).
  from model_fixtures import random_batch, tiny_config
  config = tiny_config()
  mesh = sharding.make_mesh((1, -1, 1))
  half = random_batch(config, int(config.train.batch_size) // 2)
  with pytest.raises(ValueError):
    trainer.global_batch(half, config, mesh)
  full = trainer.global_batch(random_batch(config, int(config.train.batch_size)), config, mesh)
  assert full["input_ids"].shape[0] == int(config.train.batch_size)
