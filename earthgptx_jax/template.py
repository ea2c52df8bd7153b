"""The one place for special tokens, the conversation template and the coordinate format.

Text contract (shared by the data pipeline, the model's token splicing and inference):

* A conversation is written with placeholders: `<image>` where the image goes, `<vp1>`,
  `<vp2>`, ... where the 1st, 2nd, ... visual prompt goes, and `[SEG]` in an answer where a mask
  is produced.
* Before tokenisation, `<image>` expands to `<img>` + `<im_patch>` x N_image_tokens + `</img>`
  and `<vpK>` expands to `<vp>` + `<vp_patch>` x tokens_per_prompt + `</vp>`. The model replaces
  the embeddings at `<im_patch>` / `<vp_patch>` positions with image / prompt tokens (see
  `models/earthgptx.py`); the data pipeline records, for every `<vp_patch>` position, which
  prompt token it holds (`vp_token_index`, -1 elsewhere) so that prompts may be referenced in
  any order and more than once.
* Boxes and points in text are integers in 0..COORD_BINS-1 of the image side (x by width, y by
  height): a box is `[x1,y1,x2,y2]`, a point is `[x,y]`.
* With the box head on (`model.box.head`, models/box_head.py), the model does not spell a box
  out digit by digit: the tokenizer side turns every answer box into one `[BOX]` token plus a
  target box (`answer_boxes_to_tokens`), and generation writes the head's box back in the same
  `[x1,y1,x2,y2]` text where the model emitted `[BOX]`. Records, references, metrics and the
  parser only ever see the text format.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

IMAGE_PLACEHOLDER = "<image>"
IMAGE_START = "<img>"
IMAGE_END = "</img>"
IMAGE_PATCH = "<im_patch>"
VP_START = "<vp>"
VP_END = "</vp>"
VP_PATCH = "<vp_patch>"
SEG = "[SEG]"
BOX = "[BOX]"
PAD = "<pad>"

# Tokens added to any base tokenizer, in this order (embedding rows are appended in this
# order, so resizing is deterministic).
SPECIAL_TOKENS: tuple[str, ...] = (IMAGE_START, IMAGE_END, IMAGE_PATCH, VP_START, VP_END,
                                   VP_PATCH, SEG, BOX)

VP_PLACEHOLDER_RE = re.compile(r"<vp(\d+)>")

MODALITIES: tuple[str, ...] = ("optical", "sar", "infrared")
MODALITY_PHRASE = {
    "optical": "an optical remote-sensing image",
    "sar": "a synthetic aperture radar (SAR) image",
    "infrared": "an infrared remote-sensing image",
}

SYSTEM_PROMPT = ("A chat between a user and a remote-sensing assistant. The assistant answers "
                 "about the image and the regions the user marks.")
USER_ROLE = "USER"
ASSISTANT_ROLE = "ASSISTANT"

COORD_BINS = 1000


def vp_placeholder(k: int) -> str:
  """Placeholder of the k-th visual prompt, 1-based: `<vp1>`, `<vp2>`, ..."""
  if k < 1:
    raise ValueError(f"visual prompt index: must be >= 1, got {k}")
  return f"<vp{k}>"


def modality_preamble(modality: str) -> str:
  if modality not in MODALITY_PHRASE:
    raise ValueError(f"modality: unknown value {modality!r}; expected one of {MODALITIES}")
  return f"This is {MODALITY_PHRASE[modality]}."


# ----------------------------------------------------------------------------------------------
# Coordinate text format.


class CoordinateParseError(ValueError):
  """Raised when answer text holds no well-formed coordinates."""


def _quantize(v: float, size: float, name: str) -> int:
  if not (v == v) or v in (float("inf"), float("-inf")):
    raise ValueError(f"{name}: coordinate must be finite, got {v}")
  if size <= 0:
    raise ValueError(f"image size: must be positive, got {size}")
  q = int(v / size * COORD_BINS)
  return min(max(q, 0), COORD_BINS - 1)


def _dequantize(q: int, size: float) -> float:
  # Bin centre, so that text -> geometry -> text is the identity.
  return (q + 0.5) / COORD_BINS * size


def format_box(box: Sequence[float], width: float, height: float) -> str:
  """Pixel box (x1, y1, x2, y2) of a `width` x `height` image -> `[x1,y1,x2,y2]` text."""
  x1, y1, x2, y2 = (float(v) for v in box)
  if x2 < x1 or y2 < y1:
    raise ValueError(f"box: expected x1<=x2 and y1<=y2, got {tuple(box)}")
  q = (_quantize(x1, width, "box x1"), _quantize(y1, height, "box y1"),
       _quantize(x2, width, "box x2"), _quantize(y2, height, "box y2"))
  return "[" + ",".join(str(v) for v in q) + "]"


def format_point(point: Sequence[float], width: float, height: float) -> str:
  x, y = (float(v) for v in point)
  return f"[{_quantize(x, width, 'point x')},{_quantize(y, height, 'point y')}]"


_NUMBER_LIST_RE = re.compile(r"\[\s*(-?\d+(?:\s*,\s*-?\d+)*)\s*\]")
# A bracket and what follows up to its `]` (or the end of the text, for a truncated answer).
# One holding only digits, signs, dots, commas and spaces (with a digit) is meant as
# coordinates and must be a well-formed integer list; others (`[SEG]`, `[see 2]`) are text.
_BRACKET_RE = re.compile(r"\[[^\[\]]*(?:\]|$)")
_NUMERIC_BRACKET_RE = re.compile(r"\[[\d\s,.+\-]*\d[\d\s,.+\-]*\]?")


@dataclasses.dataclass(frozen=True)
class ParsedCoordinates:
  boxes: list[tuple[float, float, float, float]]  # pixel coordinates
  points: list[tuple[float, float]]


def parse_coordinates(text: str, width: float, height: float) -> ParsedCoordinates:
  """Finds every `[x1,y1,x2,y2]` box and `[x,y]` point in `text`, in pixel coordinates.

  Raises CoordinateParseError (a ValueError) naming the offending fragment when a bracket
  holding only numbers is not a comma-separated integer list (e.g. `[0.1,0.2,0.3,0.4]`,
  `[12 34]`, or `[12,34` cut off at the end of the text), has the wrong arity or a value
  outside 0..COORD_BINS-1, or when x2<x1 / y2<y1. Text with no such bracket parses to empty
  lists.
  """
  boxes, points = [], []
  for bracket in _BRACKET_RE.finditer(text):
    if not _NUMERIC_BRACKET_RE.fullmatch(bracket.group(0)):
      continue
    match = _NUMBER_LIST_RE.fullmatch(bracket.group(0))
    if match is None:
      raise CoordinateParseError(f"coordinates {bracket.group(0)!r}: expected [x,y] or "
                                 f"[x1,y1,x2,y2] with integers in 0..{COORD_BINS - 1}")
    values = [int(v) for v in match.group(1).split(",")]
    if any(v < 0 or v >= COORD_BINS for v in values):
      raise CoordinateParseError(f"coordinates {match.group(0)!r}: values must be in "
                                 f"0..{COORD_BINS - 1}")
    if len(values) == 4:
      x1, y1, x2, y2 = values
      if x2 < x1 or y2 < y1:
        raise CoordinateParseError(f"box {match.group(0)!r}: expected x1<=x2 and y1<=y2")
      boxes.append((_dequantize(x1, width), _dequantize(y1, height),
                    _dequantize(x2, width), _dequantize(y2, height)))
    elif len(values) == 2:
      points.append((_dequantize(values[0], width), _dequantize(values[1], height)))
    else:
      raise CoordinateParseError(f"coordinates {match.group(0)!r}: expected 2 (point) or 4 "
                                 f"(box) integers, got {len(values)}")
  return ParsedCoordinates(boxes=boxes, points=points)


def answer_boxes_to_tokens(text: str, width: float, height: float
                           ) -> tuple[str, list[tuple[float, float, float, float]]]:
  """Answer text -> (text with each `[x1,y1,x2,y2]` replaced by `[BOX]`, the boxes in pixels).

  Points and non-numeric brackets stay text. Malformed coordinates raise CoordinateParseError
  (as `parse_coordinates`), so a record the text path would reject is rejected here too.
  """
  boxes = parse_coordinates(text, width, height).boxes
  if not boxes:
    return text, []
  pieces, pos = [], 0
  for match in _NUMBER_LIST_RE.finditer(text):
    if len(match.group(1).split(",")) == 4:
      pieces += [text[pos:match.start()], BOX]
      pos = match.end()
  return "".join(pieces) + text[pos:], boxes


def try_parse_boxes(text: str, width: float, height: float):
  """Boxes in `text`, or None when the text is malformed (evaluation counts it as wrong)."""
  try:
    return parse_coordinates(text, width, height).boxes
  except CoordinateParseError:
    return None


# ----------------------------------------------------------------------------------------------
# Conversation template (Vicuna-v1 style, as LLaVA / LISA):
#
#   {SYSTEM_PROMPT} USER: <image>\n{modality preamble} {question 1} ASSISTANT: {answer 1}</s>
#   USER: {question 2} ASSISTANT: {answer 2}</s>...
#
# (no line break before the second USER). The answer text (with its leading space) and the
# EOS after it are the answer tokens: the only tokens with loss. For generation the
# conversation ends with a USER turn and the rendering ends with "ASSISTANT:".


@dataclasses.dataclass(frozen=True)
class Segment:
  """A piece of rendered conversation; `is_answer` pieces are followed by EOS and get loss."""
  text: str
  is_answer: bool


def render_conversation(turns: Sequence[str], modality: str) -> list[Segment]:
  """Turns (USER, ASSISTANT, USER, ...) with placeholders -> template segments.

  The first USER turn gets `<image>` (prepended with a line break if absent) followed by the
  modality preamble. An odd number of turns renders a generation prompt. Placeholders are
  left in the text; expand them with `split_placeholders` / `expand_placeholders`.
  """
  if not turns:
    raise ValueError("conversation turns: empty; expected USER, ASSISTANT, ... turns")
  preamble = modality_preamble(modality)
  first = turns[0]
  if IMAGE_PLACEHOLDER not in first:
    first = f"{IMAGE_PLACEHOLDER}\n{first}"
  first = first.replace(IMAGE_PLACEHOLDER, f"{IMAGE_PLACEHOLDER}\n{preamble}", 1)
  turns = [first, *turns[1:]]
  segments = []
  for i in range(0, len(turns), 2):
    head = f"{SYSTEM_PROMPT} " if i == 0 else ""
    segments.append(Segment(f"{head}{USER_ROLE}: {turns[i].strip()} {ASSISTANT_ROLE}:", False))
    if i + 1 < len(turns):
      segments.append(Segment(f" {turns[i + 1].strip()}", True))
  return segments


@dataclasses.dataclass(frozen=True)
class Placeholder:
  """An `<image>` (kind "image") or `<vpK>` (kind "vp", index K-1) placeholder in text."""
  kind: str
  index: int = 0


_PLACEHOLDER_RE = re.compile(re.escape(IMAGE_PLACEHOLDER) + r"|<vp(\d+)>")


def split_placeholders(text: str) -> list[str | Placeholder]:
  """Text -> plain-text pieces and Placeholders, in order (empty pieces dropped)."""
  pieces: list[str | Placeholder] = []
  pos = 0
  for m in _PLACEHOLDER_RE.finditer(text):
    if m.start() > pos:
      pieces.append(text[pos:m.start()])
    if m.group(1) is None:
      pieces.append(Placeholder("image"))
    else:
      k = int(m.group(1))
      if k < 1:
        raise ValueError(f"visual prompt placeholder {m.group(0)!r}: index must be >= 1")
      pieces.append(Placeholder("vp", k - 1))
    pos = m.end()
  if pos < len(text):
    pieces.append(text[pos:])
  return pieces


def placeholder_tokens(placeholder: Placeholder, num_image_tokens: int,
                       tokens_per_prompt: int) -> list[str]:
  """The special tokens a placeholder expands to (see the module docstring)."""
  if placeholder.kind == "image":
    return [IMAGE_START, *[IMAGE_PATCH] * num_image_tokens, IMAGE_END]
  if placeholder.kind == "vp":
    return [VP_START, *[VP_PATCH] * tokens_per_prompt, VP_END]
  raise ValueError(f"placeholder kind: unknown value {placeholder.kind!r}; expected image or vp")


def expand_placeholders(text: str, num_image_tokens: int, tokens_per_prompt: int) -> str:
  """`<image>` / `<vpK>` -> their special-token strings (for tokenizers that know them)."""
  return "".join(p if isinstance(p, str) else
                 "".join(placeholder_tokens(p, num_image_tokens, tokens_per_prompt))
                 for p in split_placeholders(text))
