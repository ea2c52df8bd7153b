"""Shared parsing (VOC XML, COCO-style JSON, images) and task phrasing for the converters."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence

import numpy as np
from PIL import Image

from data_pipelines import schema
from data_pipelines.converters import ConversionError
from earthgptx_jax import template


@dataclasses.dataclass(frozen=True)
class Box:
  name: str
  box: tuple[float, float, float, float]  # pixel-edge x1, y1, x2, y2


@dataclasses.dataclass(frozen=True)
class VocAnnotation:
  filename: str
  width: int
  height: int
  objects: tuple[Box, ...]
  element: ET.Element  # the whole tree, for dataset-specific fields (e.g. <description>)


def require_dir(path: str, what: str) -> str:
  if not os.path.isdir(path):
    raise ConversionError(f"{what}: folder {path} not found")
  return path


def read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def image_size(data: bytes) -> tuple[int, int]:
  """(width, height) from the header, without decoding pixels; raises ValueError."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      return img.size
  except Exception as e:  # PIL raises many types. pylint: disable=broad-except
    raise ValueError(f"unreadable image: {e}") from None


def voc_box(bndbox: ET.Element) -> tuple[float, float, float, float]:
  """VOC <bndbox> (1-based inclusive pixel indices in the spec; most RS datasets write
  0-based) -> a pixel-edge box: (xmin, ymin, xmax, ymax) read as edges, as DIOR/HIT-UAV
  tools and COCO conversions do."""
  v = [float(bndbox.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
  return v[0], v[1], v[2], v[3]


def read_voc(path: str) -> VocAnnotation:
  root = ET.parse(path).getroot()
  size = root.find("size")
  width = int(float(size.findtext("width"))) if size is not None else 0
  height = int(float(size.findtext("height"))) if size is not None else 0
  objects = []
  for obj in root.findall("object"):
    bndbox = obj.find("bndbox")
    if bndbox is None:
      continue
    objects.append(Box(obj.findtext("name", "").strip(), voc_box(bndbox)))
  return VocAnnotation(root.findtext("filename", "").strip(), width, height, tuple(objects),
                       root)


def read_lines(path: str, source: str) -> list[str]:
  """Non-empty stripped lines of a split list; [] (logged) when the list is absent."""
  if not os.path.exists(path):
    logging.warning("%s: split list %s not found; the split is empty", source, path)
    return []
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def read_json(path: str):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def clip_box(box, width: int, height: int) -> tuple[float, float, float, float] | None:
  """The box clipped to the image; None when nothing of positive area remains."""
  x1, y1, x2, y2 = (float(v) for v in box)
  x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
  y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
  if x2 <= x1 or y2 <= y1:
    return None
  return x1, y1, x2, y2


def skip(source: str, item: str, reason: str) -> None:
  logging.warning("%s: skipping %s: %s", source, item, reason)


def report_missing(source: str, missing: Sequence[str], listed: int) -> None:
  """One line for files a split list names but the folder lacks (partial copies)."""
  if missing:
    logging.warning("%s: %d of %d listed images are not on disk (e.g. %s); skipped", source,
                    len(missing), listed, missing[0])


def plural(name: str) -> str:
  if name.endswith(("s", "x", "sh", "ch")):
    return name + "es"
  if name.endswith("y") and name[-2:-1] not in "aeiou":
    return name[:-1] + "ies"
  return name + "s"


def boxes_text(boxes: Sequence[Sequence[float]], width: int, height: int) -> str:
  """Boxes in the template's coordinate format, comma separated, reading order."""
  ordered = sorted(boxes, key=lambda b: (b[1], b[0]))
  return ", ".join(template.format_box(b, width, height) for b in ordered)


def union_mask(masks: Sequence[np.ndarray]) -> np.ndarray:
  return np.logical_or.reduce(np.stack(masks))


# ----------------------------------------------------------------------------------------------
# Records of the common tasks (questions phrased as in synthetic.py).


def _record(rid, image, modality, source, task, question, answer, prompts=(), masks=()):
  return schema.Record(id=rid, image=image, modality=modality, source=source, task=task,
                       turns=(f"{template.IMAGE_PLACEHOLDER}\n{question}", answer),
                       prompts=tuple(prompts), masks=tuple(masks))


def grounding(rid, image, modality, source, phrase, boxes, width, height) -> schema.Record:
  """Box grounding of `phrase`; callers ground at most schema.MAX_ANSWER_BOXES boxes (denser
  scenes get counts only), the limit the presets' model.box.max_boxes holds."""
  if not 0 < len(boxes) <= schema.MAX_ANSWER_BOXES:
    raise ValueError(f"{rid}: {len(boxes)} boxes; a grounding answer holds 1.."
                     f"{schema.MAX_ANSWER_BOXES} (schema.MAX_ANSWER_BOXES)")
  question = f"Where is {phrase}? Answer with a box." if len(boxes) == 1 else (
      f"Locate every {phrase}. Answer with boxes.")
  return _record(rid, image, modality, source, "box_grounding", question,
                 boxes_text(boxes, width, height))


def segmentation(rid, image, modality, source, phrase, mask) -> schema.Record:
  return _record(rid, image, modality, source, "referring_segmentation",
                 f"Segment the {phrase}.", template.SEG, masks=(schema.encode_mask(mask),))


def counting(rid, image, modality, source, name, count) -> schema.Record:
  return _record(rid, image, modality, source, "vqa", f"How many {plural(name)} are there?",
                 str(count))


def classify_region(rid, image, modality, source, box, name) -> schema.Record:
  return _record(rid, image, modality, source, "referring_classification",
                 "What is the object in <vp1>?", name, prompts=(schema.box_prompt(box),))


def classify_scene(rid, image, modality, source, name,
                   question="Which scene category does this image belong to?") -> schema.Record:
  return _record(rid, image, modality, source, "scene_classification", question, name)


def caption(rid, image, modality, source, text) -> schema.Record:
  return _record(rid, image, modality, source, "image_caption",
                 "Describe the image briefly.", text)


def vqa(rid, image, modality, source, question, answer) -> schema.Record:
  return _record(rid, image, modality, source, "vqa", question, answer)
