"""The grain input pipeline: stored records -> static-shape batches of earthgptx_jax/batch.py.

  per source: tfds ArrayRecord data source (sources.py) -> this process's shard
              (records process_index::process_count) -> shuffled, reshuffled every epoch,
              endless
  IterDataset.mix({name: source}, weights)     each component keeps its own position in the
                                               checkpointed state; with data.mix_tasks one
                                               component per (source, task), weighted by
                                               data.task_weights (task_components)
  -> window shuffle (data.mix_window)          batches draw sensors and tasks at random
  -> map(ExampleProcessor)    examples.py: decode, validate, preprocess, zoom views, prompts,
                              template + tokenisation with the answer-only loss mask, padding
  -> skip bad records         bad_records.py: counted per reason, logged, attached to the next
                              good example
  -> batch(B, drop_remainder)
  -> mp_prefetch (optional, data.num_workers > 0)
  -> bad-record accounting    totals per reason in the iterator state; aborts with
                              BadRecordFractionError above data.max_bad_fraction

The trainer completes the config from the tokenizer first, then prepares the data:

    tokenizer = tokenizer_training.ensure_tokenizer(config)
    config = tokenizer_lib.complete_config(config, tokenizer)
    data = pipeline.prepare(config, tokenizer)

The train iterator is a `grain.DatasetIterator`: iterate it for numpy batch dicts, and hand
the same object to Orbax to save / restore its position (MaxText's pattern):

    it = data.train_iterator(jax.process_index(), jax.process_count())
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data_iter=grain.checkpoint.CheckpointSave(it)))
    ...
    mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data_iter=grain.checkpoint.CheckpointRestore(it)))

Build a fresh iterator with the same config and process layout before restoring into it.
With data.num_workers > 0 the entry point needs an `if __name__ == "__main__":` guard, and
outside `absl.app.run` call `absl.flags.FLAGS.mark_as_parsed()` first.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import grain
import ml_collections
import numpy as np

from data_pipelines import bad_records, builders, examples, schema, slots, sources, synthetic
from earthgptx_jax import batch as batch_lib
from earthgptx_jax import tokenizer as tokenizer_lib


@dataclasses.dataclass
class Data:
  """Prepared data: the config completed from the tokenizer, and iterator factories."""
  config: ml_collections.ConfigDict
  tokenizer: Any
  task_names: tuple[str, ...] = schema.TASKS

  def train_iterator(self, process_index: int = 0, process_count: int = 1
                     ) -> bad_records.BatchIterator | StagedBatchIterator:
    return make_train_iterator(self.config, self.tokenizer, None, process_index, process_count)

  def eval_iterator(self, process_index: int = 0, process_count: int = 1, *,
                    split: str | None = None, **kwargs) -> Iterator[EvalBatch]:
    return make_eval_iterator(self.config, self.tokenizer, split, process_index, process_count,
                              **kwargs)


def prepare(config: ml_collections.ConfigDict, tokenizer) -> Data:
  """Builds the synthetic sources if they are missing and checks the model's static slots
  against the data (`slots.check_slots`). `config` must already be completed from `tokenizer`
  (`earthgptx_jax.tokenizer.complete_config`); it is used as it is."""
  _check_completed(config, tokenizer)
  if any(config.data.sources[n].dataset.startswith("synthetic_rs/") for n in config.data.sources):
    builders.ensure_synthetic(config.data.data_dir, config)
  slots.check_slots(config)
  return Data(config=config, tokenizer=tokenizer)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises the one-line error of a data setting that cannot work, before anything is written
  or generated: found where it is used, it would come after minutes of data generation and
  leave a new, empty workdir behind."""
  mix_window(config)
  checked_task_weights(config)
  if int(config.train.get("alignment_steps", 0) or 0) > 0:
    alignment_tasks(config)
  if any(config.data.sources[n].dataset.startswith("synthetic_rs/") for n in config.data.sources):
    synthetic.check_config(config.data.synthetic)


def mix_window(config: ml_collections.ConfigDict) -> int:
  window = config.data.get("mix_window", 0) or 0
  if not isinstance(window, int) or window < 0:
    raise ValueError(f"data.mix_window: need a whole number of examples >= 0 (0: no shuffle), "
                     f"got {window!r}")
  return window


def checked_task_weights(config: ml_collections.ConfigDict) -> dict[str, float]:
  """data.task_weights for every task of schema.TASKS (0 where unset)."""
  task_weights = {t: float(config.data.task_weights.get(t, 0.0)) for t in schema.TASKS}
  unknown = sorted(set(config.data.task_weights) - set(schema.TASKS))
  if unknown or any(w < 0 for w in task_weights.values()):
    raise ValueError(f"data.task_weights: {dict(config.data.task_weights)!r} must be >= 0 and "
                     f"name tasks of {schema.TASKS} (unknown: {unknown})")
  return task_weights


def alignment_tasks(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  tasks = tuple(config.data.alignment_tasks)
  unknown = [t for t in tasks if t not in schema.TASKS]
  if not tasks or unknown:
    raise ValueError(f"data.alignment_tasks: {tasks!r} must name tasks of {schema.TASKS} "
                     f"(unknown: {unknown})")
  return tasks


# ----------------------------------------------------------------------------------------------
# Training: the endless mixture.


def make_train_iterator(config: ml_collections.ConfigDict, tokenizer, split: str | None = None,
                        process_index: int = 0, process_count: int = 1
                        ) -> bad_records.BatchIterator | StagedBatchIterator:
  """Endless, mixed, checkpointable iterator of this process's train batches; with
  `train.alignment_steps` > 0, its first batches hold only `data.alignment_tasks`.

  Each process gets train.batch_size // process_count examples per batch (its part of the
  global batch).
  """
  batch_size = int(config.train.batch_size)
  if batch_size % process_count:
    raise ValueError(f"train.batch_size: {batch_size} is not divisible by {process_count} "
                     "processes")
  split = split or config.data.train_split

  def batches(tasks=None) -> bad_records.BatchIterator:
    records = mixed_records(config, split, process_index, process_count, tasks)
    return make_batches(records, config, tokenizer, batch_size // process_count).__iter__()

  alignment_steps = int(config.train.get("alignment_steps", 0) or 0)
  if alignment_steps <= 0:
    return batches()
  return StagedBatchIterator(batches(alignment_tasks(config)), batches(), alignment_steps)


class StagedBatchIterator(grain.DatasetIterator):
  """An alignment stage, then the full mixture, in one run (LLaVA trains its projector on
  captions before instruction tuning; here both stages train the same parameters).

  The first `alignment_batches` batches come from `alignment` (records of
  `data.alignment_tasks` only), the rest from `main`. Why: in a many-task mixture from random
  encoders, the answers that need the image (land cover, object classes) stay at chance for the
  tiny preset's whole budget, while a short stage of image-level questions first ties the
  image tokens to words that the later tasks build on (measured in the README's run).

  Its state holds both positions and the batch count, so a resume in either stage is exact.
  """

  def __init__(self, alignment: bad_records.BatchIterator, main: bad_records.BatchIterator,
               alignment_batches: int):
    super().__init__([alignment, main])
    self._alignment, self._main = alignment, main
    self.alignment_batches = alignment_batches
    self.batches = 0

  @property
  def good_records(self) -> int:
    return self._alignment.good_records + self._main.good_records

  @property
  def bad_records(self) -> dict[str, int]:
    totals = collections.Counter(self._alignment.bad_records)
    totals.update(self._main.bad_records)
    return dict(totals)

  def __next__(self) -> dict[str, np.ndarray]:
    stage = self._alignment if self.batches < self.alignment_batches else self._main
    batch = next(stage)
    self.batches += 1
    return batch

  def get_state(self):
    return {"batches": self.batches, "alignment": self._alignment.get_state(),
            "main": self._main.get_state()}

  def set_state(self, state):
    self._alignment.set_state(state["alignment"])
    self._main.set_state(state["main"])
    self.batches = int(state["batches"])


def make_batches(records: grain.IterDataset, config: ml_collections.ConfigDict, tokenizer,
                 batch_size: int) -> grain.IterDataset:
  """Stored records -> processed, bad-record-filtered, batched (and prefetched) dataset."""
  ds = bad_records.SkipBad(records.map(examples.ExampleProcessor(config, tokenizer)))
  ds = ds.batch(batch_size, drop_remainder=True)
  workers = int(config.data.num_workers)
  if workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=int(config.data.worker_buffer_size)))
  return bad_records.BadRecordAccounting(ds, float(config.data.max_bad_fraction),
                                         int(config.data.bad_check_min_records))


def mixed_records(config: ml_collections.ConfigDict, split: str, process_index: int = 0,
                  process_count: int = 1, tasks: Sequence[str] | None = None
                  ) -> grain.IterDataset:
  """The mixture of `mixed_indices`, read: stored feature dicts of every source (only those
  of `tasks` when given)."""
  opened = {name: sources.data_source(config, name, split) for name in sources.weights(config)}
  sizes = {name: len(source) for name, source in opened.items()}
  by_task = bool(config.data.get("mix_tasks", False))
  records = mixed_indices(config, sizes, process_index, process_count,
                          tasks if by_task else None).map(_Read(opened))
  return records.filter(_HasTask(tasks)) if tasks is not None and not by_task else records


def mixed_indices(config: ml_collections.ConfigDict, sizes: Mapping[str, int], process_index: int,
                  process_count: int, tasks: Sequence[str] | None = None) -> grain.IterDataset:
  """Endless weighted mixture of (component name, record index) over this process's shards.

  Each component is shuffled (differently every epoch) and repeated, so the mixture never
  ends; `IterDataset.mix` over a dict keeps each component's position in the state; with
  `data.mix_window` > 1 the mixed stream is shuffled in windows of that many elements.
  """
  weights = sources.weights(config)
  shards = {name: _shard(sizes[name], name, process_index, process_count) for name in weights}
  if config.data.get("mix_tasks", False):
    parts = task_components(config, shards, tasks)
  else:
    parts = {name: (name, shard, weight) for (name, weight), shard in
             zip(weights.items(), shards.values())}
  components = {}
  for k, (key, (name, indices, _)) in enumerate(parts.items()):
    ds = _EpochShuffled(name, indices, seed=int(config.seed) * 1009 + k)
    # Indices are free to produce: no read threads (records are read after the mix).
    components[key] = ds.to_iter_dataset(grain.ReadOptions(num_threads=0,
                                                           prefetch_buffer_size=0))
  mixed = grain.IterDataset.mix(components, {key: w for key, (_, _, w) in parts.items()})
  window = mix_window(config)
  if window <= 1:
    return mixed
  # grain's mix is a fixed interleave: by (source, task) it fills a whole batch from one
  # sensor. Shuffling each window of the index stream keeps the window's proportions and
  # gives every batch a random draw of sensors and tasks; its state is the window's start, so
  # a resume re-reads that window's indices (no records) and stays exact.
  return grain.experimental.WindowShuffleIterDataset(mixed, window_size=window,
                                                     seed=int(config.seed) * 1013 + 7)


def task_components(config: ml_collections.ConfigDict, shards: Mapping[str, Sequence[int]],
                    tasks: Sequence[str] | None = None
                    ) -> dict[str, tuple[str, np.ndarray, float]]:
  """Mixture components by (source, task): "source/task" -> (source, record indices, weight).

  Task t gets the share data.task_weights[t] / (their sum over the tasks present) of the
  mixture, whatever its share of the stored records; within a task, the sources that hold it
  split it by their source weights. The task of every record of this process's shard is read
  once, here (~0.2 ms a record). `tasks` (the alignment stage's) keeps only those.
  """
  task_weights = checked_task_weights(config)
  if tasks is not None:
    task_weights = {t: (w if t in tasks else 0.0) for t, w in task_weights.items()}
  source_weights = sources.weights(config)
  by_task: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
  for name, shard in shards.items():
    source = sources.data_source(config, name, config.data.train_split)
    indices = np.asarray(shard, np.int64)
    record_tasks = np.asarray([schema.feature_text(source[int(i)]["task"]) for i in indices])
    for task in schema.TASKS:
      if task_weights[task] > 0 and (record_tasks == task).any():
        by_task[task][name] = indices[record_tasks == task]
  if not by_task:
    raise ValueError(f"data.task_weights: {dict(config.data.task_weights)!r} gives no stored "
                     "task a positive weight")
  total = sum(task_weights[t] for t in by_task)
  parts = {}
  for task in schema.TASKS:
    if task not in by_task:
      continue
    mass = sum(source_weights[n] for n in by_task[task])
    for name, indices in by_task[task].items():
      share = task_weights[task] / total * source_weights[name] / mass
      parts[f"{name}/{task}"] = (name, indices, share)
  return parts


# ----------------------------------------------------------------------------------------------
# Evaluation: one balanced pass.


class EvalBatch(NamedTuple):
  batch: dict[str, np.ndarray]  # batch.py fields; padding rows are all zeros
  valid: np.ndarray  # [B] bool, False for padding rows of the last batch
  records: list  # [B] the schema.Record of each row (None for padding): references


def make_eval_iterator(config: ml_collections.ConfigDict, tokenizer, split: str | None = None,
                       process_index: int = 0, process_count: int = 1,
                       batch_size: int | None = None,
                       max_examples: int | None = None,
                       max_per_task: int | None = None) -> Iterator[EvalBatch]:
  """One pass over the held-out split of every source (this process's shard), the sources
  interleaved round-robin so any prefix (`max_examples`) is balanced, in batches padded to a
  static shape; bad records are skipped and logged.

  `max_per_task` (default train.eval_examples_per_task; None or 0: no cap) stratifies by task:
  records of a task that already has that many examples are passed over, so a split whose
  tasks are drawn at random still evaluates each task on about as many examples.
  """
  batch_size = int(batch_size or config.train.batch_size)
  if max_per_task is None:
    max_per_task = config.train.get("eval_examples_per_task", None)
  max_per_task = int(max_per_task or 0)
  per_task: collections.Counter = collections.Counter()
  processor = examples.ExampleProcessor(config, tokenizer)
  opened = eval_sources(config, split or config.data.eval_split)
  shards = [(opened[n], iter(_shard(len(opened[n]), n, process_index, process_count)))
            for n in opened]
  rows, records, seen = [], [], 0

  def emit():
    out = batch_lib.example_batch(config, batch_size)
    for k in out:
      for i, row in enumerate(rows):
        out[k][i] = row[k]
    valid = np.arange(batch_size) < len(rows)
    return EvalBatch(out, valid, records + [None] * (batch_size - len(rows)))

  while shards and (max_examples is None or seen < max_examples):
    source, indices = shards.pop(0)
    index = next(indices, None)
    if index is None:
      continue
    shards.append((source, indices))
    features = source[index]
    if max_per_task:
      task = schema.feature_text(features["task"])
      if per_task[task] >= max_per_task:
        continue
    example = processor(features)
    if isinstance(example, bad_records.BadRecord):
      logging.warning("skipping bad eval record (%s): %s", example.reason, example.message)
      continue
    seen += 1
    if max_per_task:
      per_task[task] += 1
    rows.append(example)
    records.append(schema.from_features(features))
    if len(rows) == batch_size:
      yield emit()
      rows, records = [], []
  if rows:
    yield emit()


def eval_sources(config: ml_collections.ConfigDict, split: str) -> dict[str, Any]:
  """name -> random-access source of `split`, for every source with a positive weight."""
  return {name: sources.data_source(config, name, split) for name in sources.weights(config)}


# ----------------------------------------------------------------------------------------------
# Helpers.


def _check_completed(config: ml_collections.ConfigDict, tokenizer) -> None:
  """The model's vocabulary and special-token ids are the tokenizer's."""
  hint = "complete the config with earthgptx_jax.tokenizer.complete_config(config, tokenizer)"
  if int(config.model.llm.vocab_size) < len(tokenizer):
    raise ValueError(f"model.llm.vocab_size: {config.model.llm.vocab_size} is smaller than the "
                     f"tokenizer's {len(tokenizer)} tokens; {hint}")
  token_ids = config.model.get("token_ids", None)
  token_ids = {} if token_ids is None else token_ids
  for name, value in tokenizer_lib.special_token_ids(tokenizer).items():
    if token_ids.get(name, None) != value:
      raise ValueError(f"model.token_ids.{name}: {token_ids.get(name, None)!r}, but the "
                       f"tokenizer's is {value}; {hint}")


def _shard(num_records: int, name: str, process_index: int, process_count: int) -> range:
  """Record indices of this process: index::count, so processes see disjoint shards."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index: {process_index} not in 0..{process_count - 1}")
  if num_records < process_count:
    raise ValueError(f"data.sources.{name}: {num_records} records cannot be sharded over "
                     f"{process_count} processes")
  return range(process_index, num_records, process_count)


class _EpochShuffled(grain.MapDataset):
  """Endless (component name, record index): element i is epoch i // n, reshuffled per epoch.

  Random access (so grain checkpoints it as one position). Replaces MapDataset.shuffle +
  repeat, whose per-element index_shuffle costs ~1 ms here, more than reading a record.
  """

  def __init__(self, name: str, indices: Sequence[int], seed: int):
    super().__init__()
    self.name, self.indices, self.seed = name, indices, seed
    self._epoch, self._order = -1, None

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f"_EpochShuffled({self.name}, {len(self.indices)} records)"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, position = divmod(int(index), len(self.indices))
    if epoch != self._epoch:
      self._epoch = epoch
      self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))
    return self.name, int(self.indices[self._order[position]])


class _Read:
  """(component name, index) -> the stored feature dict."""

  def __init__(self, sources: Mapping[str, Any]):
    self.sources = dict(sources)

  def __call__(self, item: tuple[str, int]) -> dict[str, Any]:
    name, index = item
    return self.sources[name][index]


class _HasTask:
  """Keeps stored records whose task is one of `tasks`."""

  def __init__(self, tasks: Sequence[str]):
    self.tasks = frozenset(tasks)

  def __call__(self, features: Mapping[str, Any]) -> bool:
    return schema.feature_text(features["task"]) in self.tasks
