"""The record schema: what one training example is, on disk and in memory.

Every source (the procedural `synthetic_rs`, every real-format converter) produces `Record`s;
the TFDS builders store them as flat ArrayRecord features (`FEATURE_SPEC`), and the pipeline
turns them back into `Record`s and validates them before anything expensive happens. See
`data_pipelines/README.md` for the full description and examples.

Conventions:
  * Coordinates are in original image pixels, x by width, y by height, pixel edges (the pixel
    at column c spans [c, c + 1)); a box (x1, y1, x2, y2) covers its pixels exactly.
  * `turns` alternate USER, ASSISTANT, USER, ... and end with an ASSISTANT answer.
  * Masks (targets and mask prompts) are single-channel PNG bytes of the image's size,
    foreground > 0.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from earthgptx_jax import tasks, template

# Index = `task_id` in the batch (earthgptx_jax/batch.py). Append new tasks at the end only.
TASKS: tuple[str, ...] = tasks.NAMES  # earthgptx_jax/tasks.py: one place per task
MODALITIES: tuple[str, ...] = template.MODALITIES

# Visual prompt kinds, their batch `prompt_type`, and how many points each stores.
PROMPT_KINDS: tuple[str, ...] = ("point", "box", "polygon", "scribble", "mask")
PROMPT_TYPE = {"point": 0, "box": 1, "polygon": 2, "scribble": 2, "mask": 2}


def _valid_point_count(kind: str, n: int) -> bool:
  return {"point": n == 1, "box": n == 2, "polygon": n >= 3, "scribble": n >= 2,
          "mask": n == 0}[kind]


# Why a record is unusable. Each is a counter in the pipeline's bad-record statistics
# (bad_records.py). New reasons go at the end: a saved iterator state's shorter counts then
# restore with zeros for them.
BAD_REASONS: tuple[str, ...] = (
    "corrupt_image",          # image bytes do not decode, or decode to an unusable array
    "unknown_modality",
    "unknown_task",
    "bad_prompt",             # unknown kind, wrong number of points, non-finite values
    "prompt_out_of_bounds",   # a prompt lies (partly) outside the image
    "bad_placeholder",        # <image> missing/misplaced, or <vpK> names a missing prompt
    "corrupt_mask",           # a mask's bytes do not decode
    "mask_size_mismatch",     # a mask's size differs from the image's
    "seg_mask_count_mismatch",  # number of [SEG] tokens != number of target masks
    "no_answer",              # no ASSISTANT turn, or an empty one
    "too_long",               # the prompt part alone exceeds data.max_length
    "too_many",               # more prompts / [SEG] masks / [BOX] boxes than the static slots
    "bad_answer_box",         # box head on: an answer's coordinates do not parse
    "empty_mask",             # a [SEG] target mask has no foreground (nothing to segment)
)

# The most answer boxes (`[x1,y1,x2,y2]` in a record's answers) a converter writes: denser
# scenes get counts only, so answers stay within a few hundred tokens. Every preset's
# `model.box.max_boxes` holds this many (tests/test_data_limits.py), and `pipeline.prepare`
# checks each dataset's stored `record_stats.json` against the model's slots.
MAX_ANSWER_BOXES = 10


class BadRecordError(ValueError):
  """A record that cannot become a training example; `reason` is one of BAD_REASONS."""

  def __init__(self, reason: str, message: str):
    if reason not in BAD_REASONS:
      raise ValueError(f"reason: unknown value {reason!r}; expected one of {BAD_REASONS}")
    super().__init__(f"{reason}: {message}")
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class VisualPrompt:
  """One visual prompt in original pixel coordinates.

  points: [N, 2] float32 (x, y): point N=1, box N=2 ((x1, y1), (x2, y2)), polygon N>=3,
  scribble N>=2 (a polyline), mask N=0 with `mask` PNG bytes.
  """
  kind: str
  points: np.ndarray
  mask: bytes = b""


@dataclasses.dataclass(frozen=True)
class Record:
  """One example: an image, what it is, the visual prompts, the conversation, the targets."""
  id: str
  image: bytes  # encoded PNG / JPEG / TIFF, 8 or 16 bit, 1..N bands
  modality: str  # one of MODALITIES
  source: str  # dataset name, e.g. "dior_rsvg"
  task: str  # one of TASKS
  turns: tuple[str, ...]  # USER, ASSISTANT, ... with <image>, <vpK>, [SEG] placeholders
  prompts: tuple[VisualPrompt, ...] = ()
  masks: tuple[bytes, ...] = ()  # one PNG per [SEG], in order of appearance

  @property
  def task_id(self) -> int:
    return TASKS.index(self.task)

  @property
  def modality_id(self) -> int:
    return MODALITIES.index(self.modality)


def feature_spec():
  """TFDS features of a stored record (flat: TFDS cannot store ragged nested sequences
  without TensorFlow, so prompts are parallel lists plus one concatenated point array)."""
  import tensorflow_datasets as tfds  # Only the builders need TFDS.
  f = tfds.features
  return f.FeaturesDict({
      "id": f.Text(),
      "image": f.Tensor(shape=(), dtype=np.object_),
      "modality": f.Text(),
      "source": f.Text(),
      "task": f.Text(),
      "turns": f.Sequence(f.Text()),
      "prompt_kind": f.Sequence(f.Text()),
      "prompt_num_points": f.Tensor(shape=(None,), dtype=np.int32),
      "prompt_points": f.Tensor(shape=(None, 2), dtype=np.float32),
      "prompt_mask": f.Sequence(f.Tensor(shape=(), dtype=np.object_)),
      "masks": f.Sequence(f.Tensor(shape=(), dtype=np.object_)),
  })


def to_features(record: Record) -> dict:
  """Record -> the flat dict `feature_spec()` stores."""
  points = [np.asarray(p.points, np.float32).reshape(-1, 2) for p in record.prompts]
  return {
      "id": record.id,
      "image": record.image,
      "modality": record.modality,
      "source": record.source,
      "task": record.task,
      "turns": list(record.turns),
      "prompt_kind": [p.kind for p in record.prompts],
      "prompt_num_points": np.asarray([len(p) for p in points], np.int32),
      "prompt_points": (np.concatenate(points) if points else np.zeros((0, 2), np.float32)),
      "prompt_mask": [p.mask for p in record.prompts],
      "masks": list(record.masks),
  }


def feature_text(v) -> str:
  """A stored text feature (bytes from TFDS, str in memory) as str."""
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def from_features(features: Mapping) -> Record:
  """The flat stored dict (text as bytes, as TFDS decodes it) -> Record.

  Raises BadRecordError("bad_prompt") when the prompt arrays disagree with each other.
  """
  kinds = [feature_text(k) for k in features["prompt_kind"]]
  counts = np.asarray(features["prompt_num_points"], np.int64).reshape(-1)
  points = np.asarray(features["prompt_points"], np.float32).reshape(-1, 2)
  prompt_masks = list(features["prompt_mask"])
  if len(counts) != len(kinds) or len(prompt_masks) != len(kinds) or (
      counts.sum() != len(points)) or (counts < 0).any():
    raise BadRecordError("bad_prompt", f"prompt arrays disagree: {len(kinds)} kinds, "
                         f"{len(counts)} point counts summing to {counts.sum()}, "
                         f"{len(points)} points, {len(prompt_masks)} masks")
  offsets = np.concatenate([[0], np.cumsum(counts)])
  prompts = tuple(
      VisualPrompt(kind=k, points=points[offsets[i]:offsets[i + 1]], mask=bytes(prompt_masks[i]))
      for i, k in enumerate(kinds))
  return Record(
      id=feature_text(features["id"]), image=bytes(features["image"]),
      modality=feature_text(features["modality"]), source=feature_text(features["source"]),
      task=feature_text(features["task"]), turns=tuple(feature_text(t) for t in features["turns"]),
      prompts=prompts, masks=tuple(bytes(m) for m in features["masks"]))


# ----------------------------------------------------------------------------------------------
# Validation (cheap checks on the record itself; image decoding is examples.py's job).


def validate(record: Record, width: int, height: int) -> None:
  """Raises BadRecordError naming the first problem of `record` (image `width` x `height`)."""
  if record.modality not in MODALITIES:
    raise BadRecordError("unknown_modality", f"modality {record.modality!r} of record "
                         f"{record.id!r}; expected one of {MODALITIES}")
  if record.task not in TASKS:
    raise BadRecordError("unknown_task",
                         f"task {record.task!r} of record {record.id!r}; expected one of {TASKS}")
  _validate_turns(record)
  for i, prompt in enumerate(record.prompts):
    _validate_prompt(prompt, i, width, height)
  num_seg = sum(t.count(template.SEG) for t in record.turns[1::2])
  if num_seg != len(record.masks):
    raise BadRecordError("seg_mask_count_mismatch", f"record {record.id!r} has {num_seg} "
                         f"{template.SEG} tokens but {len(record.masks)} masks")
  for q, mask in enumerate(record.masks):
    if not decode_mask(mask, width, height, f"mask {q}").any():
      raise BadRecordError("empty_mask", f"record {record.id!r}: target mask {q} is all zero "
                           f"(a {template.SEG} with nothing to segment)")


def _validate_turns(record: Record) -> None:
  turns = record.turns
  if len(turns) < 2 or not turns[1].strip():
    raise BadRecordError("no_answer", f"record {record.id!r} has no ASSISTANT answer "
                         f"({len(turns)} turns)")
  if any(not t.strip() for t in turns[1::2]):
    raise BadRecordError("no_answer", f"record {record.id!r} has an empty ASSISTANT turn")
  if len(turns) % 2:
    turns = turns[:-1]  # A trailing unanswered question is dropped by the template.
  image_counts = [t.count(template.IMAGE_PLACEHOLDER) for t in turns]
  if image_counts[0] > 1 or any(image_counts[1:]):
    raise BadRecordError("bad_placeholder", f"record {record.id!r}: {template.IMAGE_PLACEHOLDER} "
                         f"may appear once, in the first USER turn; counts {image_counts}")
  for t in turns:
    for m in template.VP_PLACEHOLDER_RE.finditer(t):
      k = int(m.group(1))
      if not 1 <= k <= len(record.prompts):
        raise BadRecordError("bad_placeholder", f"record {record.id!r}: {m.group(0)} but "
                             f"{len(record.prompts)} visual prompts")
  if any(template.SEG in t for t in turns[0::2]):
    raise BadRecordError("bad_placeholder", f"record {record.id!r}: {template.SEG} in a USER turn")


def _validate_prompt(prompt: VisualPrompt, i: int, width: int, height: int) -> None:
  if prompt.kind not in PROMPT_KINDS:
    raise BadRecordError("bad_prompt", f"prompt {i}: kind {prompt.kind!r}; expected one of "
                         f"{PROMPT_KINDS}")
  pts = np.asarray(prompt.points, np.float64).reshape(-1, 2)
  if not _valid_point_count(prompt.kind, len(pts)):
    raise BadRecordError("bad_prompt", f"prompt {i}: {prompt.kind} with {len(pts)} points")
  if not np.isfinite(pts).all():
    raise BadRecordError("bad_prompt", f"prompt {i}: non-finite coordinates")
  if prompt.kind == "box" and (pts[1] < pts[0]).any():
    raise BadRecordError("bad_prompt", f"prompt {i}: box {pts.reshape(-1).tolist()} has "
                         "x2<x1 or y2<y1")
  # Points name a pixel, so they lie in [0, W) x [0, H); other prompts in [0, W] x [0, H].
  edge = prompt.kind == "point"
  if (pts < 0).any() or (pts[:, 0] > width).any() or (pts[:, 1] > height).any() or (
      edge and ((pts[:, 0] >= width).any() or (pts[:, 1] >= height).any())):
    raise BadRecordError("prompt_out_of_bounds", f"prompt {i} ({prompt.kind}) "
                         f"{pts.reshape(-1).tolist()} outside the {width}x{height} image")
  if prompt.kind == "mask":
    m = decode_mask(prompt.mask, width, height, f"prompt {i} mask")
    if not m.any():
      raise BadRecordError("bad_prompt", f"prompt {i}: empty mask")


def answer_box_count(turns: Sequence[str]) -> int:
  """`[x1,y1,x2,y2]` boxes in the ASSISTANT turns: the [BOX] slots the record needs with the
  box head on (0 for text whose coordinates do not parse: that record is `bad_answer_box`)."""
  answers = turns[1:len(turns) - len(turns) % 2:2]
  try:  # the count does not depend on the image size
    return sum(len(template.parse_coordinates(t, 1, 1).boxes) for t in answers)
  except template.CoordinateParseError:
    return 0


# ----------------------------------------------------------------------------------------------
# Mask encoding.


def encode_mask(mask: np.ndarray) -> bytes:
  """[H, W] bool -> single-channel PNG bytes ({0, 255})."""
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"mask: expected [H, W], got shape {mask.shape}")
  buf = io.BytesIO()
  Image.fromarray((mask > 0).astype(np.uint8) * 255, mode="L").save(buf, format="PNG")
  return buf.getvalue()


def decode_mask(data: bytes, width: int, height: int, name: str = "mask") -> np.ndarray:
  """PNG bytes -> [H, W] bool; raises BadRecordError on bad bytes or a size mismatch."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      arr = np.asarray(img)
  except Exception as e:  # PIL raises many types on corrupt input. pylint: disable=broad-except
    raise BadRecordError("corrupt_mask", f"{name}: {type(e).__name__}: {e}") from None
  if arr.ndim == 3:
    arr = arr.max(axis=-1)
  if arr.ndim != 2:
    raise BadRecordError("corrupt_mask", f"{name}: decoded shape {arr.shape}")
  if arr.shape != (height, width):
    raise BadRecordError("mask_size_mismatch", f"{name}: {arr.shape[1]}x{arr.shape[0]} mask "
                         f"for a {width}x{height} image")
  return arr > 0


def mask_to_box(mask: np.ndarray) -> tuple[float, float, float, float]:
  """[H, W] bool -> the tight pixel-edge box (x1, y1, x2, y2); raises on an empty mask."""
  ys, xs = np.nonzero(mask)
  if not len(xs):
    raise ValueError("mask: empty, has no box")
  return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def box_prompt(box: Sequence[float]) -> VisualPrompt:
  x1, y1, x2, y2 = (float(v) for v in box)
  return VisualPrompt("box", np.asarray([[x1, y1], [x2, y2]], np.float32))


def point_prompt(x: float, y: float) -> VisualPrompt:
  return VisualPrompt("point", np.asarray([[x, y]], np.float32))


def scribble_width(height: int, width: int) -> float:
  """Stroke width (original pixels) of scribble prompts: 1% of the longer side, >= 2 px, so
  a scribble stays a few pixels wide in the global view at any image size."""
  return max(2.0, 0.01 * max(height, width))
