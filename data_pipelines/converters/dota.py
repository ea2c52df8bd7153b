"""DOTA v1: large optical aerial scenes with oriented boxes (`labelTxt`).

Layout: `images/<id>.png` and `labelTxt/<id>.txt`: optional header lines (`imagesource:...`,
`gsd:...`), then one object per line `x1 y1 x2 y2 x3 y3 x4 y4 class difficult`. Oriented boxes
become their enclosing horizontal boxes, clipped to the image. Each image gives a count per
class (dense counting) and a box grounding for classes with at most `schema.MAX_ANSWER_BOXES`
objects.
The split is the folder: pass `train/` or `val/` of the release, or any folder with
`images/` and `labelTxt/` (all of it is `train`; `validation` is then empty).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from data_pipelines import schema
from data_pipelines.converters import common

SPLITS = ("train", "validation")
_SPLIT_DIRS = {"train": "train", "validation": "val"}
SOURCE = "dota"


def parse_label_file(path: str) -> list[tuple[str, np.ndarray, int]]:
  """-> [(class, polygon [4, 2], difficult)]; header and malformed lines are skipped."""
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      parts = line.split()
      if len(parts) < 9 or ":" in line:
        continue
      try:
        poly = np.asarray([float(v) for v in parts[:8]]).reshape(4, 2)
      except ValueError:
        continue
      out.append((parts[8], poly, int(parts[9]) if len(parts) > 9 else 0))
  return out


def records(manual_dir: str, split: str) -> Iterator[schema.Record]:
  root = os.path.join(manual_dir, _SPLIT_DIRS[split])
  if not os.path.isdir(root):
    if split != "train":
      return
    root = manual_dir
  label_dir = common.require_dir(os.path.join(root, "labelTxt"), SOURCE)
  for name in sorted(n for n in os.listdir(label_dir) if n.endswith(".txt")):
    stem = name[:-4]
    image_path = os.path.join(root, "images", f"{stem}.png")
    if not os.path.exists(image_path):
      common.skip(SOURCE, stem, "image file missing")
      continue
    image = common.read_bytes(image_path)
    width, height = common.image_size(image)
    by_class = {}
    for cls, poly, _ in parse_label_file(os.path.join(label_dir, name)):
      box = common.clip_box((*poly.min(0), *poly.max(0)), width, height)
      if box is not None:
        by_class.setdefault(cls.replace("-", " "), []).append(box)
    for cls, boxes in sorted(by_class.items()):
      yield common.counting(f"{SOURCE}-{stem}-count-{cls}", image, "optical", SOURCE, cls,
                            len(boxes))
      if len(boxes) <= schema.MAX_ANSWER_BOXES:
        yield common.grounding(f"{SOURCE}-{stem}-box-{cls}", image, "optical", SOURCE,
                               f"the {cls}" if len(boxes) == 1 else cls, boxes, width, height)
