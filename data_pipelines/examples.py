"""One stored record -> one example: the batch fields of earthgptx_jax/batch.py without the
batch dimension.

  decode + validate (schema.py)      -> image bytes to pixels, record checks
  per-modality preprocessing         -> preprocess.py
  zoom views                         -> views.py (pixels), geometry.py (affines)
  visual prompts                     -> rasterize.py, in the global view
  conversation                       -> template + tokenisation, answer-only loss mask, [BOX] /
                                        [SEG] tokens, truncation to data.max_length
  answer boxes, [SEG] target masks   -> the global-view frame

A bad record raises `schema.BadRecordError` inside `process`; `__call__` turns it into a
`bad_records.BadRecord` marker that the pipeline counts and skips.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from data_pipelines import bad_records, preprocess, rasterize, schema, views
from earthgptx_jax import geometry, template
from earthgptx_jax import tokenizer as tokenizer_lib


class ExampleProcessor:
  """Stored feature dict -> one example.

  Raises only `schema.BadRecordError` for bad data (`__call__` turns it into a `BadRecord`
  marker); anything else is a bug and propagates.
  """

  def __init__(self, config: ml_collections.ConfigDict, tokenizer):
    self.config = config
    self.tokenizer = tokenizer
    self.ids = types.SimpleNamespace(**tokenizer_lib.special_token_ids(tokenizer))
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

  def __call__(self, features: Mapping[str, Any]) -> dict[str, np.ndarray] | bad_records.BadRecord:
    try:
      return self.process(features)
    except schema.BadRecordError as e:
      return bad_records.BadRecord(e.reason, f"record {record_id(features)}: {e}")

  def process(self, features: Mapping[str, Any]) -> dict[str, np.ndarray]:
    record = schema.from_features(features)
    raw = _decode(record)
    height, width = raw.shape[:2]
    schema.validate(record, width, height)
    self._check_slots(record)
    try:
      pixels = preprocess.preprocess(raw, record.modality, self.config.model.vision.preprocess)
    except ValueError as e:
      raise schema.BadRecordError("corrupt_image", str(e)) from None
    view = views.make_views(pixels, self.image_size, self.max_tiles)
    global_affine = view.affine[0]
    example = dict(pixel_values=view.pixels, view_valid=view.valid, view_affine=view.affine)
    example.update(self._prompt_fields(record, height, width, global_affine))
    text, num_seg, boxes = self.tokenize(record.turns, record.modality, view.valid,
                                         image_hw=(height, width))
    example.update(text)
    example.update(self._box_fields(boxes, global_affine))
    example.update(self._seg_fields(record, num_seg, height, width, global_affine))
    example.update(image_size=np.asarray([height, width], np.int32),
                   task_id=np.int32(record.task_id), modality_id=np.int32(record.modality_id))
    return example

  def tokenize(self, turns: Sequence[str], modality: str, views_valid: np.ndarray, image_hw
               ) -> tuple[dict[str, np.ndarray], int, list]:
    """Conversation -> (text fields of length L, the number of [SEG] tokens kept, the pixel
    boxes of the [BOX] tokens kept, in order). `image_hw`: the original (height, width), the
    frame of the answers' coordinates.

    Over-long conversations lose whole trailing turns first, then the tail of the last kept
    answer (never the prompt, so image and prompt tokens stay whole); a prompt part that
    alone reaches L raises BadRecordError("too_long").
    """
    encoded, boxes = self._encode_turns(turns, modality, views_valid, image_hw)
    fields, answer_ids = self._text_fields(self._fit_length(encoded))
    num_seg = answer_ids.count(self.ids.seg)
    num_boxes = answer_ids.count(self.ids.box)
    if self.box_head and num_boxes > self.max_boxes:
      raise schema.BadRecordError("too_many", f"{num_boxes} answer boxes, "
                                  f"model.box.max_boxes={self.max_boxes}")
    return fields, num_seg, boxes[:num_boxes]

  # --------------------------------------------------------------------------------------------
  # The steps of `process`.

  def _check_slots(self, record: schema.Record) -> None:
    if len(record.prompts) > self.max_prompts:
      raise schema.BadRecordError("too_many", f"{len(record.prompts)} visual prompts, "
                                  f"model.prompt.max_prompts={self.max_prompts}")
    if len(record.masks) > self.max_seg:
      raise schema.BadRecordError("too_many", f"{len(record.masks)} [SEG] masks, "
                                  f"model.pixel.max_seg={self.max_seg}")

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
      in_view = geometry.boxes_to_view(np.asarray(boxes), global_affine) / self.image_size
      targets[:len(boxes)] = np.clip(in_view, 0.0, 1.0)
    return dict(box_targets=targets, box_valid=np.arange(self.max_boxes) < len(boxes))

  def _seg_fields(self, record: schema.Record, num_seg: int, height: int, width: int,
                  global_affine: np.ndarray) -> dict[str, np.ndarray]:
    """The target masks of the `num_seg` [SEG] tokens kept, warped to the global view."""
    seg_masks = np.zeros((self.max_seg, self.image_size, self.image_size), np.float32)
    for q in range(num_seg):
      mask = schema.decode_mask(record.masks[q], width, height, f"mask {q}")
      seg_masks[q] = views.warp_to_view(mask.astype(np.float32), global_affine,
                                        self.image_size, order=0)
    return dict(seg_masks=seg_masks, seg_valid=np.arange(self.max_seg) < num_seg)

  # --------------------------------------------------------------------------------------------
  # The steps of `tokenize`.

  def _encode_turns(self, turns: Sequence[str], modality: str, views_valid: np.ndarray,
                    image_hw) -> tuple[list[_Turn], list]:
    """Complete (question, answer) pairs -> their tokens, and the answers' pixel boxes in
    order (the [BOX] tokens' targets, with the box head on)."""
    if len(turns) % 2:
      turns = turns[:-1]
    segments = template.render_conversation(turns, modality)
    encoded, boxes = [], []
    for i in range(0, len(segments), 2):
      prompt = self._encode_prompt(segments[i].text, views_valid)
      answer_text, answer_boxes = self._answer_text(segments[i + 1].text, image_hw)
      boxes += answer_boxes
      encoded.append(_Turn(prompt, self._encode(answer_text) + [self.ids.eos]))
    return encoded, boxes

  def _fit_length(self, turns: list[_Turn]) -> list[_Turn]:
    """Drops whole trailing turns, then cuts the last kept answer, until BOS + the turns fit
    data.max_length."""
    limit = self.max_length

    def total(tt):
      return 1 + sum(len(t.prompt.ids) + len(t.answer) for t in tt)

    turns = list(turns)
    while len(turns) > 1 and total(turns) > limit:
      turns.pop()
    if total(turns) > limit:
      (prompt, answer), = turns
      room = limit - 1 - len(prompt.ids)
      if room < 1:
        raise schema.BadRecordError("too_long", f"the prompt alone is {len(prompt.ids) + 1} "
                                    f"tokens; data.max_length={limit}")
      turns = [_Turn(prompt, answer[:room])]
    return turns

  def _text_fields(self, turns: list[_Turn]) -> tuple[dict[str, np.ndarray], list[int]]:
    """BOS + the turns -> the text fields padded to L (targets shifted by one, the loss on
    answer tokens only), and the answer token ids."""
    ids, vp, visible, answer_mask = [self.ids.bos], [-1], [True], [False]
    for prompt, answer in turns:
      ids += prompt.ids + answer
      vp += prompt.vp_index + [-1] * len(answer)
      visible += prompt.visible + [True] * len(answer)
      answer_mask += [False] * len(prompt.ids) + [True] * len(answer)
    limit, n = self.max_length, len(ids)
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
    fields = dict(input_ids=input_ids, attention_mask=attention, targets=targets,
                  loss_mask=loss_mask, vp_token_index=vp_index)
    return fields, [i for i, a in zip(ids, answer_mask) if a]

  def _encode_prompt(self, text: str, views_valid: np.ndarray) -> _Prompt:
    """A rendered question: text, and the image / visual-prompt placeholders as their tokens."""
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
    return _Prompt(ids, vp_index, visible)

  def _answer_text(self, text: str, image_hw) -> tuple[str, list]:
    """With the box head on: the answer's boxes -> [BOX] tokens and their pixel boxes."""
    if not self.box_head:
      return text, []
    try:  # a literal "[BOX]" typed in the data has no target box: it must not become the token
      return template.answer_boxes_to_tokens(text.replace(template.BOX, " "), image_hw[1],
                                             image_hw[0])
    except template.CoordinateParseError as e:
      raise schema.BadRecordError("bad_answer_box", str(e)) from None

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


def record_id(features: Mapping[str, Any]) -> str:
  """The stored record's id, for messages ("?" when it has none)."""
  value = features.get("id", b"?") if isinstance(features, Mapping) else b"?"
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _Prompt(NamedTuple):
  """A question's tokens: ids, the visual-prompt token index of each (-1: none), and whether
  each is attended to (False at image tokens of padding views)."""
  ids: list[int]
  vp_index: list[int]
  visible: list[bool]


class _Turn(NamedTuple):
  prompt: _Prompt
  answer: list[int]  # ends with EOS unless truncated


def _decode(record: schema.Record) -> np.ndarray:
  try:
    return preprocess.decode_image(record.image)
  except ValueError as e:
    raise schema.BadRecordError("corrupt_image", str(e)) from None
