"""The grain input pipeline: stored records -> static-shape batches of earthgptx_jax/batch.py.

  per source: tfds ArrayRecord data source -> MapDataset -> this process's shard
              (records process_index::process_count) -> shuffle (reshuffled every epoch)
              -> repeat
  IterDataset.mix({name: source}, weights)     each component keeps its own position in the
                                               checkpointed state
  -> map(ExampleProcessor)    decode, validate, per-modality preprocessing, zoom views
                              (views.py), prompt rasterisation (rasterize.py), template +
                              tokenisation with the answer-only loss mask, static padding
  -> skip bad records         counted per reason, logged, attached to the next good example
  -> batch(B, drop_remainder)
  -> mp_prefetch (optional, data.num_workers > 0)
  -> bad-record accounting    totals per reason in the iterator state; aborts with
                              BadRecordFractionError above data.max_bad_fraction

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
import copy
import dataclasses
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import grain
import ml_collections
import numpy as np

from data_pipelines import builders, preprocess, rasterize, schema, views
from earthgptx_jax import template

_BAD_KEY = "_bad_records"  # [len(BAD_REASONS)] counts attached to examples until accounted


class BadRecordFractionError(RuntimeError):
  """More than data.max_bad_fraction of the records read so far were unusable."""


class SlotLimitError(ValueError):
  """A dataset's records need more static slots (answer boxes, prompts, masks) than the
  model's config gives: a data / config mismatch, found at start-up."""


# ----------------------------------------------------------------------------------------------
# Tokens.


@dataclasses.dataclass(frozen=True)
class TokenIds:
  """Ids of the template's special tokens and BOS / EOS / PAD in one tokenizer."""
  bos: int
  eos: int
  pad: int
  image_start: int
  image_end: int
  image_patch: int
  vp_start: int
  vp_end: int
  vp_patch: int
  seg: int
  box: int

  @classmethod
  def from_tokenizer(cls, tokenizer) -> TokenIds:
    special = dict(image_start=template.IMAGE_START, image_end=template.IMAGE_END,
                   image_patch=template.IMAGE_PATCH, vp_start=template.VP_START,
                   vp_end=template.VP_END, vp_patch=template.VP_PATCH, seg=template.SEG,
                   box=template.BOX)
    ids = {}
    unk = getattr(tokenizer, "unk_token_id", None)
    for name, token in special.items():
      value = tokenizer.convert_tokens_to_ids(token)
      if value is None or value == unk:
        raise ValueError(f"tokenizer: special token {token!r} ({name}) is missing; load it "
                         "with earthgptx_jax.tokenizer, which adds template.SPECIAL_TOKENS")
      ids[name] = int(value)
    for name in ("bos", "eos"):
      value = getattr(tokenizer, f"{name}_token_id")
      if value is None:
        raise ValueError(f"tokenizer: has no {name} token")
      ids[name] = int(value)
    pad = tokenizer.pad_token_id
    ids["pad"] = int(ids["eos"] if pad is None else pad)
    return cls(**ids)


# ----------------------------------------------------------------------------------------------
# One example.


class _Bad(NamedTuple):
  reason: str
  message: str


class ExampleProcessor:
  """Stored feature dict -> one example (the batch fields without the batch dimension).

  Raises only `schema.BadRecordError` for bad data (`__call__` turns it into a `_Bad`
  marker the pipeline counts and skips); anything else is a bug and propagates.
  """

  def __init__(self, config: ml_collections.ConfigDict, tokenizer):
    self.config = config
    self.tokenizer = tokenizer
    self.ids = TokenIds.from_tokenizer(tokenizer)
    vision, prompt = config.model.vision, config.model.prompt
    self.image_size = int(vision.image_size)
    self.max_tiles = int(vision.max_tiles)
    self.num_views = 1 + self.max_tiles
    self.tokens_per_view = int(vision.token_grid) ** 2
    self.tokens_per_prompt = int(prompt.tokens_per_prompt)
    self.max_prompts = int(prompt.max_prompts)
    self.map_size = int(prompt.map_size)
    self.max_seg = int(config.model.pixel.max_seg)
    self.box_head = bool(config.model.box.head)
    self.max_boxes = int(config.model.box.max_boxes)
    self.max_length = int(config.data.max_length)

  def __call__(self, features: Mapping[str, Any]) -> dict[str, np.ndarray] | _Bad:
    try:
      return self.process(features)
    except schema.BadRecordError as e:
      return _Bad(e.reason, f"record {_record_id(features)}: {e}")

  def process(self, features: Mapping[str, Any]) -> dict[str, np.ndarray]:
    record = schema.from_features(features)
    try:
      raw = preprocess.decode_image(record.image)
    except ValueError as e:
      raise schema.BadRecordError("corrupt_image", str(e)) from None
    height, width = raw.shape[:2]
    schema.validate(record, width, height)
    if len(record.prompts) > self.max_prompts:
      raise schema.BadRecordError("too_many", f"{len(record.prompts)} visual prompts, "
                                  f"model.prompt.max_prompts={self.max_prompts}")
    if len(record.masks) > self.max_seg:
      raise schema.BadRecordError("too_many", f"{len(record.masks)} [SEG] masks, "
                                  f"model.pixel.max_seg={self.max_seg}")
    try:
      pixels = preprocess.preprocess(raw, record.modality,
                                           self.config.model.vision.preprocess)
    except ValueError as e:
      raise schema.BadRecordError("corrupt_image", str(e)) from None
    view = views.make_views(pixels, self.image_size, self.max_tiles)
    example = dict(pixel_values=view.pixels, view_valid=view.valid, view_affine=view.affine)
    example.update(self._prompt_fields(record, height, width, view.affine[0]))
    text, num_seg, boxes = self.tokenize(record.turns, record.modality, view.valid,
                                         image_hw=(height, width))
    example.update(text)
    example.update(self._box_fields(boxes, view.affine[0]))
    seg_masks = np.zeros((self.max_seg, self.image_size, self.image_size), np.float32)
    for q in range(num_seg):
      mask = schema.decode_mask(record.masks[q], width, height, f"mask {q}")
      seg_masks[q] = views.warp_to_view(mask.astype(np.float32), view.affine[0],
                                              self.image_size, order=0)
    example.update(
        seg_masks=seg_masks, seg_valid=np.arange(self.max_seg) < num_seg,
        image_size=np.asarray([height, width], np.int32),
        task_id=np.int32(record.task_id), modality_id=np.int32(record.modality_id))
    return example

  def _prompt_fields(self, record: schema.Record, height: int, width: int,
                     global_affine: np.ndarray) -> dict[str, np.ndarray]:
    stroke = schema.scribble_width(height, width)
    prompts = []
    for p in record.prompts:
      if p.kind == "mask":
        prompts.append(rasterize.Prompt(
            "mask", mask=schema.decode_mask(p.mask, width, height, "prompt mask")))
      elif p.kind in ("point", "box"):
        prompts.append(rasterize.Prompt(p.kind, coords=np.asarray(p.points).reshape(-1)))
      else:
        prompts.append(rasterize.Prompt(p.kind, coords=p.points, width=stroke))
    try:
      return rasterize.prompt_fields(prompts, (height, width), global_affine,
                                           self.image_size, self.map_size, self.max_prompts)
    except ValueError as e:  # e.g. a zero-area polygon: the rasteriser names the prompt.
      raise schema.BadRecordError("bad_prompt", str(e)) from None

  def _box_fields(self, boxes, global_affine: np.ndarray) -> dict[str, np.ndarray]:
    """Answer boxes in original pixels -> box_targets / box_valid in the global-view frame."""
    targets = np.zeros((self.max_boxes, 4), np.float32)
    if boxes:
      in_view = views.boxes_to_view(np.asarray(boxes), global_affine) / self.image_size
      targets[:len(boxes)] = np.clip(in_view, 0.0, 1.0)
    return dict(box_targets=targets, box_valid=np.arange(self.max_boxes) < len(boxes))

  def _encode(self, text: str) -> list[int]:
    """Plain text (may hold [SEG], and [BOX] with the box head on) -> ids; those map to their
    one special id each, while other special-token strings typed in text (e.g. "<im_patch>")
    stay ordinary text, so only the template places image and prompt tokens."""
    ids: list[int] = []
    for k, piece in enumerate(text.split(template.SEG)):
      if k:
        ids.append(self.ids.seg)
      for j, part in enumerate(piece.split(template.BOX) if self.box_head else [piece]):
        if j:
          ids.append(self.ids.box)
        if part:
          ids.extend(self.tokenizer.encode(part, add_special_tokens=False,
                                           split_special_tokens=True))
    return ids

  def _answer_text(self, text: str, image_hw) -> tuple[str, list]:
    """With the box head on: the answer's boxes -> [BOX] tokens and their pixel boxes."""
    if not self.box_head:
      return text, []
    try:  # a literal "[BOX]" typed in the data has no target box: it must not become the token
      return template.answer_boxes_to_tokens(text.replace(template.BOX, " "), image_hw[1],
                                             image_hw[0])
    except template.CoordinateParseError as e:
      raise schema.BadRecordError("bad_answer_box", str(e)) from None

  def _encode_segment(self, text: str, views_valid: np.ndarray):
    """-> ids, vp_index, visible (False at image tokens of padding views)."""
    ids, vp_index, visible = [], [], []
    for piece in template.split_placeholders(text):
      if isinstance(piece, str):
        new = self._encode(piece)
        ids += new
        vp_index += [-1] * len(new)
        visible += [True] * len(new)
      elif piece.kind == "image":
        n = self.tokens_per_view
        ids += [self.ids.image_start, *[self.ids.image_patch] * (n * self.num_views),
                self.ids.image_end]
        vp_index += [-1] * (n * self.num_views + 2)
        visible += [True, *np.repeat(views_valid, n).tolist(), True]
      else:
        k = self.tokens_per_prompt
        ids += [self.ids.vp_start, *[self.ids.vp_patch] * k, self.ids.vp_end]
        vp_index += [-1, *range(piece.index * k, (piece.index + 1) * k), -1]
        visible += [True] * (k + 2)
    return ids, vp_index, visible

  def tokenize(self, turns, modality: str, views_valid: np.ndarray, image_hw
               ) -> tuple[dict[str, np.ndarray], int, list]:
    """Conversation -> (text fields of length L, the number of [SEG] tokens kept, the pixel
    boxes of the [BOX] tokens kept, in order). `image_hw`: the original (height, width), the
    frame of the answers' coordinates.

    Over-long conversations lose whole trailing turns first, then the tail of the last kept
    answer (never the prompt, so image and prompt tokens stay whole); a prompt part that
    alone reaches L raises BadRecordError("too_long").
    """
    if len(turns) % 2:
      turns = turns[:-1]
    segments = template.render_conversation(turns, modality)
    turns_tokens = []  # [(prompt ids, vp, visible), (answer ids)]
    boxes = []
    for i in range(0, len(segments), 2):
      prompt = self._encode_segment(segments[i].text, views_valid)
      answer_text, answer_boxes = self._answer_text(segments[i + 1].text, image_hw)
      boxes += answer_boxes
      answer = self._encode(answer_text) + [self.ids.eos]
      turns_tokens.append((prompt, answer))
    limit = self.max_length

    def total(tt):
      return 1 + sum(len(p[0]) + len(a) for p, a in tt)

    while len(turns_tokens) > 1 and total(turns_tokens) > limit:
      turns_tokens.pop()
    if total(turns_tokens) > limit:
      (prompt, answer), = turns_tokens
      room = limit - 1 - len(prompt[0])
      if room < 1:
        raise schema.BadRecordError("too_long", f"the prompt alone is {len(prompt[0]) + 1} "
                                    f"tokens; data.max_length={limit}")
      turns_tokens = [(prompt, answer[:room])]
    ids, vp, visible, answer_mask = [self.ids.bos], [-1], [True], [False]
    for (p_ids, p_vp, p_visible), a_ids in turns_tokens:
      ids += p_ids + a_ids
      vp += p_vp + [-1] * len(a_ids)
      visible += p_visible + [True] * len(a_ids)
      answer_mask += [False] * len(p_ids) + [True] * len(a_ids)
    n = len(ids)
    input_ids = np.full(limit, self.ids.pad, np.int32)
    input_ids[:n] = ids
    attention = np.zeros(limit, bool)
    attention[:n] = visible
    targets = np.full(limit, self.ids.pad, np.int32)
    targets[:n - 1] = ids[1:]
    loss_mask = np.zeros(limit, bool)
    loss_mask[:n - 1] = answer_mask[1:]
    vp_index = np.full(limit, -1, np.int32)
    vp_index[:n] = vp
    num_seg = int(sum(i == self.ids.seg for i, a in zip(ids, answer_mask) if a))
    num_boxes = int(sum(i == self.ids.box for i, a in zip(ids, answer_mask) if a))
    if self.box_head and num_boxes > self.max_boxes:
      raise schema.BadRecordError("too_many", f"{num_boxes} answer boxes, "
                                  f"model.box.max_boxes={self.max_boxes}")
    return dict(input_ids=input_ids, attention_mask=attention, targets=targets,
                loss_mask=loss_mask, vp_token_index=vp_index), num_seg, boxes[:num_boxes]


def _record_id(features: Mapping[str, Any]) -> str:
  value = features.get("id", b"?") if isinstance(features, Mapping) else b"?"
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------------------------
# Bad records.


class _SkipBad(grain.IterDataset):
  """Drops `_Bad` markers, logging each; their counts ride on the next good example."""

  def __iter__(self):
    return _SkipBadIterator(self._parent.__iter__())


class _SkipBadIterator(grain.DatasetIterator):

  def __init__(self, parent):
    super().__init__(parent)
    self._pending = np.zeros(len(schema.BAD_REASONS), np.int64)

  def __next__(self):
    while True:
      item = next(self._parent)
      if isinstance(item, _Bad):
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
    self._pending = np.asarray(state["pending"], np.int64)


class _BadRecordAccounting(grain.IterDataset):
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
    self.bad = np.asarray(state["bad_records"], np.int64)


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

  def __init__(self, alignment: BatchIterator, main: BatchIterator, alignment_batches: int):
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


# ----------------------------------------------------------------------------------------------
# Pipelines.


def source_data_dir(config: ml_collections.ConfigDict, dataset: str) -> str:
  """Where `dataset` is stored: synthetic data under its size fingerprint, others in data_dir."""
  data_dir = os.path.expanduser(config.data.data_dir)
  if dataset.startswith("synthetic_rs/"):
    fingerprint = builders.synthetic_fingerprint(config.data.synthetic)
    return os.path.join(data_dir, f"synthetic_rs_{fingerprint}")
  return data_dir


def _source(config, name: str, split: str):
  dataset = config.data.sources[name].dataset
  return builders.data_source(dataset, split, source_data_dir(config, dataset),
                              synthetic_config=config.data.synthetic)


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

  def __init__(self, name: str, indices: range, seed: int):
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
    return self.name, self.indices[self._order[position]]


class _Read:
  """(component name, index) -> the stored feature dict."""

  def __init__(self, sources: Mapping[str, Any]):
    self.sources = dict(sources)

  def __call__(self, item: tuple[str, int]) -> dict[str, Any]:
    name, index = item
    return self.sources[name][index]


def _weights(config) -> dict[str, float]:
  sources = config.data.sources
  if not sources:
    raise ValueError("data.sources: empty; name at least one dataset with a weight")
  weights = {name: float(sources[name].weight) for name in sorted(sources)}
  if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
    raise ValueError(f"data.sources weights: must be >= 0 with a positive sum, got {weights}")
  return {name: w for name, w in weights.items() if w > 0}


def mixed_indices(config: ml_collections.ConfigDict, sizes: Mapping[str, int], process_index: int,
                  process_count: int) -> grain.IterDataset:
  """Endless weighted mixture of (component name, record index) over this process's shards.

  Each component is shuffled (differently every epoch) and repeated, so the mixture never
  ends; `IterDataset.mix` over a dict keeps each component's position in the state.
  """
  weights = _weights(config)
  components = {}
  for k, name in enumerate(weights):
    ds = _EpochShuffled(name, _shard(sizes[name], name, process_index, process_count),
                        seed=int(config.seed) * 1009 + k)
    # Indices are free to produce: no read threads (records are read after the mix).
    components[name] = ds.to_iter_dataset(grain.ReadOptions(num_threads=0,
                                                            prefetch_buffer_size=0))
  return grain.IterDataset.mix(components, weights)


class _HasTask:
  """Keeps stored records whose task is one of `tasks`."""

  def __init__(self, tasks: Sequence[str]):
    self.tasks = frozenset(tasks)

  def __call__(self, features: Mapping[str, Any]) -> bool:
    return schema.feature_text(features["task"]) in self.tasks


def mixed_records(config: ml_collections.ConfigDict, split: str, process_index: int = 0,
                  process_count: int = 1, tasks: Sequence[str] | None = None
                  ) -> grain.IterDataset:
  """The mixture of `mixed_indices`, read: stored feature dicts of every source (only those
  of `tasks` when given)."""
  sources = {name: _source(config, name, split) for name in _weights(config)}
  sizes = {name: len(source) for name, source in sources.items()}
  records = mixed_indices(config, sizes, process_index, process_count).map(_Read(sources))
  return records.filter(_HasTask(tasks)) if tasks is not None else records


def make_batches(records: grain.IterDataset, config: ml_collections.ConfigDict, tokenizer,
                 batch_size: int) -> grain.IterDataset:
  """Stored records -> processed, bad-record-filtered, batched (and prefetched) dataset."""
  ds = _SkipBad(records.map(ExampleProcessor(config, tokenizer)))
  ds = ds.batch(batch_size, drop_remainder=True)
  workers = int(config.data.num_workers)
  if workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=int(config.data.worker_buffer_size)))
  return _BadRecordAccounting(ds, float(config.data.max_bad_fraction),
                              int(config.data.bad_check_min_records))


def make_train_iterator(config: ml_collections.ConfigDict, tokenizer, split: str | None = None,
                        process_index: int = 0, process_count: int = 1
                        ) -> BatchIterator | StagedBatchIterator:
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

  def batches(tasks=None) -> BatchIterator:
    records = mixed_records(config, split, process_index, process_count, tasks)
    return make_batches(records, config, tokenizer, batch_size // process_count).__iter__()

  alignment_steps = int(config.train.get("alignment_steps", 0) or 0)
  if alignment_steps <= 0:
    return batches()
  tasks = tuple(config.data.alignment_tasks)
  unknown = [t for t in tasks if t not in schema.TASKS]
  if not tasks or unknown:
    raise ValueError(f"data.alignment_tasks: {tasks!r} must name tasks of {schema.TASKS} "
                     f"(unknown: {unknown})")
  return StagedBatchIterator(batches(tasks), batches(), alignment_steps)


def eval_sources(config: ml_collections.ConfigDict, split: str) -> dict[str, Any]:
  """name -> random-access source of `split`, for every source with a positive weight."""
  return {name: _source(config, name, split) for name in _weights(config)}


class EvalBatch(NamedTuple):
  batch: dict[str, np.ndarray]  # batch.py fields; padding rows are all zeros
  valid: np.ndarray  # [B] bool, False for padding rows of the last batch
  records: list  # [B] the schema.Record of each row (None for padding): references


def make_eval_iterator(config: ml_collections.ConfigDict, tokenizer, split: str | None = None,
                       process_index: int = 0, process_count: int = 1,
                       batch_size: int | None = None,
                       max_examples: int | None = None) -> Iterator[EvalBatch]:
  """One pass over the held-out split of every source (this process's shard), the sources
  interleaved round-robin so any prefix (`max_examples`) is balanced, in batches padded to a
  static shape; bad records are skipped and logged."""
  from earthgptx_jax import batch as batch_lib
  batch_size = int(batch_size or config.train.batch_size)
  processor = ExampleProcessor(config, tokenizer)
  sources = eval_sources(config, split or config.data.eval_split)
  shards = [(sources[n], iter(_shard(len(sources[n]), n, process_index, process_count)))
            for n in sources]
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
    example = processor(features)
    if isinstance(example, _Bad):
      logging.warning("skipping bad eval record (%s): %s", example.reason, example.message)
      continue
    seen += 1
    rows.append(example)
    records.append(schema.from_features(features))
    if len(rows) == batch_size:
      yield emit()
      rows, records = [], []
  if rows:
    yield emit()


# ----------------------------------------------------------------------------------------------
# What the trainer calls.


@dataclasses.dataclass
class Data:
  """Prepared data: the config with tokenizer-derived fields filled, and iterator factories."""
  config: ml_collections.ConfigDict
  tokenizer: Any
  task_names: tuple[str, ...] = schema.TASKS

  def train_iterator(self, process_index: int = 0, process_count: int = 1
                     ) -> BatchIterator | StagedBatchIterator:
    return make_train_iterator(self.config, self.tokenizer, None, process_index, process_count)

  def eval_iterator(self, process_index: int = 0, process_count: int = 1, *,
                    split: str | None = None, **kwargs) -> Iterator[EvalBatch]:
    return make_eval_iterator(self.config, self.tokenizer, split, process_index, process_count,
                              **kwargs)


def ensure_tokenizer(config: ml_collections.ConfigDict):
  """model.llm.tokenizer_path if set; else the project tokenizer trained on the synthetic text
  (built once next to the synthetic data)."""
  from earthgptx_jax import tokenizer as tokenizer_lib
  path = config.model.llm.get("tokenizer_path", None)
  if path:
    return tokenizer_lib.load_tokenizer(os.path.expanduser(path))
  folder = os.path.join(source_data_dir(config, "synthetic_rs/optical"),
                        f"tokenizer_{int(config.model.llm.vocab_size)}")
  with builders.exclusive(folder):  # one builder among concurrent processes
    if not os.path.exists(os.path.join(folder, "tokenizer.json")):
      builders.ensure_synthetic(config.data.data_dir, config)
      tokenizer_lib.build_tokenizer(list(synthetic_texts(config)),
                                    int(config.model.llm.vocab_size), folder)
  return tokenizer_lib.load_tokenizer(folder)


def synthetic_texts(config: ml_collections.ConfigDict) -> Iterator[str]:
  """Every rendered conversation turn of the synthetic train split (tokenizer corpus)."""
  for modality in schema.MODALITIES:
    dataset = f"synthetic_rs/{modality}"
    source = builders.data_source(dataset, "train", source_data_dir(config, dataset),
                                  synthetic_config=config.data.synthetic)
    for i in range(len(source)):
      turns = [t.decode("utf-8") for t in source[i]["turns"]]
      for segment in template.render_conversation(turns, modality):
        yield segment.text


# Per-record statistics (builders.split_stats) and the config slot that must hold each.
_SLOTS = (("max_answer_boxes", "model.box.max_boxes", "answers with up to {} boxes"),
          ("max_prompts", "model.prompt.max_prompts", "records with up to {} visual prompts"),
          ("max_masks", "model.pixel.max_seg", "records with up to {} [SEG] masks"))


def source_stats(config: ml_collections.ConfigDict) -> dict[str, dict | None]:
  """{dataset: its record_stats ({split: stats})} of every built source with weight > 0; None
  (logged) for a dataset built before the stats existed. Unbuilt ones are left out: reading
  them raises the error that names the build command."""
  out = {}
  for name in _weights(config):
    dataset = config.data.sources[name].dataset
    data_dir = source_data_dir(config, dataset)
    builder = builders.get_builder(dataset, data_dir, synthetic_config=config.data.synthetic)
    if not builder.is_prepared():
      continue
    out[dataset] = builders.read_stats(builder)
    if out[dataset] is None:
      logging.warning(
          "dataset %s under %s has no %s (built before the stats existed): its records are "
          "not checked against the config; add them with `python -m data_pipelines.build "
          "--dataset %s --manual_dir DIR --data_dir %s` (reads the stored records, rebuilds "
          "nothing)", dataset, data_dir, builders.STATS_FILE, dataset, data_dir)
  return out


def check_slots(config: ml_collections.ConfigDict) -> None:
  """Raises SlotLimitError (one line: the setting, the dataset that overflows it, the value that
  fits) when a source's stored records need more answer boxes / prompts / [SEG] masks than the
  model's static slots; such records would otherwise be skipped as `too_many` mid-training.
  Also raises (ValueError) when an alignment stage is asked for but no source's train split
  has a record of `data.alignment_tasks` (its filter would wait forever).

  Reads each source's `record_stats.json` (train and eval splits). A dataset built before the
  stats existed is not checked: a warning says how to add them.
  """
  limits = {"model.box.max_boxes": int(config.model.box.max_boxes),
            "model.prompt.max_prompts": int(config.model.prompt.max_prompts),
            "model.pixel.max_seg": int(config.model.pixel.max_seg)}
  if not config.model.box.head:  # boxes stay text: no [BOX] slots are filled
    del limits["model.box.max_boxes"]
  stats = source_stats(config)
  worst = {}  # setting -> (needed, "dataset/split")
  for dataset, splits in stats.items():
    for split in dict.fromkeys((config.data.train_split, config.data.eval_split)):
      for key, setting, _ in _SLOTS:
        needed = int((splits or {}).get(split, {}).get(key, 0))
        if setting in limits and needed > worst.get(setting, (limits[setting], ""))[0]:
          worst[setting] = (needed, f"{dataset}/{split}")
  messages = []
  for _, setting, what in _SLOTS:
    if setting in worst:
      needed, where = worst[setting]
      messages.append(f"{setting}={limits[setting]} but dataset {where} has "
                      f"{what.format(needed)}: set --config.{setting}={needed}")
  if messages:
    raise SlotLimitError("; ".join(messages))
  alignment_steps = int(config.train.get("alignment_steps", 0) or 0)
  tasks = tuple(config.data.alignment_tasks)
  split = config.data.train_split
  if alignment_steps > 0 and stats and None not in stats.values() and not sum(
      s.get(split, {}).get("tasks", {}).get(t, 0) for s in stats.values() for t in tasks):
    raise ValueError(f"train.alignment_steps={alignment_steps} but no source ({sorted(stats)}) "
                     f"has {split} records of data.alignment_tasks {tasks}: set "
                     "--config.train.alignment_steps=0 or add a source with those tasks")


def prepare(config: ml_collections.ConfigDict) -> Data:
  """Builds what is missing (synthetic data, tokenizer), checks the model's static slots
  against the data (`check_slots`) and fills the config's model.llm.vocab_size and
  model.token_ids from the tokenizer. Returns a new config."""
  config = copy.deepcopy(config)
  if any(config.data.sources[n].dataset.startswith("synthetic_rs/") for n in config.data.sources):
    builders.ensure_synthetic(config.data.data_dir, config)
  check_slots(config)
  tokenizer = ensure_tokenizer(config)
  ids = TokenIds.from_tokenizer(tokenizer)
  with config.unlocked():
    config.model.llm.vocab_size = max(int(config.model.llm.vocab_size),
                                      len(tokenizer))
    if "token_ids" not in config.model:
      config.model.token_ids = ml_collections.ConfigDict()
    for name, value in dataclasses.asdict(ids).items():
      config.model.token_ids[name] = value
  return Data(config=config, tokenizer=tokenizer)

