"""SSDD: SAR ship detection (VOC XML boxes).

Layout: `Annotations/*.xml`, `JPEGImages/*.jpg`. Split by SSDD's own rule: images whose
number ends in 1 or 9 are the test set. Each image gives a ship count and a box grounding.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

from data_pipelines import schema
from data_pipelines.converters import common

SPLITS = ("train", "test")
SOURCE = "ssdd"


def is_test(stem: str) -> bool:
  digits = re.findall(r"\d", stem)
  return bool(digits) and digits[-1] in "19"


def records(manual_dir: str, split: str) -> Iterator[schema.Record]:
  ann_dir = common.require_dir(os.path.join(manual_dir, "Annotations"), SOURCE)
  for name in sorted(n for n in os.listdir(ann_dir) if n.endswith(".xml")):
    stem = name[:-4]
    if is_test(stem) != (split == "test"):
      continue
    voc = common.read_voc(os.path.join(ann_dir, name))
    image_path = os.path.join(manual_dir, "JPEGImages", voc.filename or f"{stem}.jpg")
    if not os.path.exists(image_path):
      common.skip(SOURCE, stem, "image file missing")
      continue
    image = common.read_bytes(image_path)
    width, height = common.image_size(image)
    boxes = [b for b in (common.clip_box(o.box, width, height) for o in voc.objects) if b]
    yield common.counting(f"{SOURCE}-{stem}-count", image, "sar", SOURCE, "ship", len(boxes))
    if 0 < len(boxes) <= schema.MAX_ANSWER_BOXES:
      yield common.grounding(f"{SOURCE}-{stem}-box", image, "sar", SOURCE,
                             "the ship" if len(boxes) == 1 else "ship", boxes, width, height)
