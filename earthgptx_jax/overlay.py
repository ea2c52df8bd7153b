"""The picture of an answer: the image as the model sees it, the user's prompts, and the
predicted boxes and masks (`render_overlay`, for the infer CLI and a demo alike)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_pipelines import preprocess, schema
from earthgptx_jax import generate

_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180)]
# The user's prompts: bright cyan over a black halo, so they show on hot (white) infrared
# targets and on dark sea alike; predictions use _COLOURS over the same halo.
_PROMPT_COLOUR = (0, 255, 255)
_HALO = (0, 0, 0)


class _Pen(NamedTuple):
  line: int  # stroke width (px)
  halo: int  # dark border on each side of a stroke (px)
  font: Any  # PIL font for labels


def _pen(height: int, width: int) -> _Pen:
  """Stroke and label sizes proportional to the image's short side (a 4592x3072 scene gets
  8 px lines and 77 px labels), with minimums that keep small images readable."""
  short = min(height, width)
  line = max(2, round(short / 400))
  size = max(13, round(short / 40))
  try:
    font = ImageFont.load_default(size=size)  # scalable since Pillow 10.1
  except TypeError:  # older Pillow: the fixed bitmap font
    font = ImageFont.load_default()
  return _Pen(line, max(1, round(line / 2)), font)


def _label(draw, xy, text: str, colour, pen: _Pen) -> None:
  draw.text(xy, text, fill=colour, font=pen.font, stroke_width=pen.halo, stroke_fill=_HALO)


def _rectangle(draw, box, colour, pen: _Pen) -> None:
  x1, y1, x2, y2 = (float(v) for v in box)
  h = pen.halo
  draw.rectangle([x1 - h, y1 - h, x2 + h, y2 + h], outline=_HALO, width=pen.line + 2 * h)
  draw.rectangle([x1, y1, x2, y2], outline=colour, width=pen.line)


def _box_label(draw, box, text: str, colour, pen: _Pen) -> None:
  """A box's label just above its top-left corner (inside it at the image's top edge), clear
  of any box drawn inside it."""
  x1, y1 = float(box[0]), float(box[1])
  left, _, _, bottom = draw.textbbox((0, 0), text, font=pen.font, stroke_width=pen.halo)
  above = y1 - pen.halo - bottom - pen.halo
  pad = pen.line + 2 * pen.halo
  _label(draw, (x1 - left, above) if above >= 0 else (x1 + pad, y1 + pad), text, colour, pen)


def render_overlay(image_bytes: bytes, modality: str, prompts, prediction: generate.Prediction,
                   preprocess_cfg) -> Image.Image:
  """The image (as the model sees it after per-modality preprocessing), the user's prompts
  (cyan, labelled vp1..), predicted boxes (coloured, labelled box1..) and masks (tinted).
  Every stroke and label has a dark halo; sizes scale with the image (`_pen`)."""
  pixels = preprocess.preprocess(preprocess.decode_image(image_bytes), modality, preprocess_cfg)
  height, width = pixels.shape[:2]
  canvas = (np.clip(pixels, 0, 1) * 255).astype(np.float32)
  for q, mask in enumerate(prediction.masks):
    colour = np.asarray(_COLOURS[q % len(_COLOURS)], np.float32)
    canvas[mask] = 0.5 * canvas[mask] + 0.5 * colour
  for p in prompts:  # mask prompts are tinted before anything is drawn over them
    if p.kind == "mask":
      m = schema.decode_mask(p.mask, width, height)
      canvas[m] = 0.5 * canvas[m] + 0.5 * np.asarray(_PROMPT_COLOUR, np.float32)
  img = Image.fromarray(canvas.astype(np.uint8))
  draw = ImageDraw.Draw(img)
  pen = _pen(height, width)
  pad = pen.line + 2 * pen.halo  # labels start clear of the stroke they name
  for k, p in enumerate(prompts):
    label = f"vp{k + 1}"
    pts = np.asarray(p.points, np.float32).reshape(-1, 2)
    if p.kind == "point":
      x, y = (float(v) for v in pts[0])
      r, h = 3 * pen.line + 2, pen.halo
      draw.ellipse([x - r - h, y - r - h, x + r + h, y + r + h], outline=_HALO,
                   width=pen.line + 2 * h)
      draw.ellipse([x - r, y - r, x + r, y + r], outline=_PROMPT_COLOUR, width=pen.line)
      _label(draw, (x + r + pad, y - r), label, _PROMPT_COLOUR, pen)
    elif p.kind == "box":
      _rectangle(draw, pts.reshape(-1), _PROMPT_COLOUR, pen)
      _box_label(draw, pts.reshape(-1), label, _PROMPT_COLOUR, pen)
    elif p.kind in ("polygon", "scribble"):
      xy = [tuple(map(float, v)) for v in pts] + (
          [tuple(map(float, pts[0]))] if p.kind == "polygon" else [])
      draw.line(xy, fill=_HALO, width=pen.line + 2 * pen.halo, joint="curve")
      draw.line(xy, fill=_PROMPT_COLOUR, width=pen.line, joint="curve")
      _label(draw, (float(pts[0][0]) + pad, float(pts[0][1]) + pad), label, _PROMPT_COLOUR, pen)
    else:
      ys, xs = np.nonzero(schema.decode_mask(p.mask, width, height))
      if len(xs):
        _label(draw, (float(xs.min()), float(ys.min())), label, _PROMPT_COLOUR, pen)
  for b, box in enumerate(prediction.boxes):
    colour = _COLOURS[b % len(_COLOURS)]
    _rectangle(draw, box, colour, pen)
    _box_label(draw, box, f"box{b + 1}", colour, pen)
  return img
