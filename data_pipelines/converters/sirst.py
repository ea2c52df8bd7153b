"""SIRST: infrared small targets with pixel masks and VOC boxes.

Layout: `images/<id>.png` (RGB / RGBA / grey / palette PNGs of grey IR imagery),
`masks/<id>_pixels0.png` (binary {0, 255}, all targets), `masks/<id>.xml` (VOC boxes),
`idx_427/{train,val,test}.txt` (ids). Each image gives a referring-segmentation record (the
mask) and a box-grounding record (the boxes). Images whose mask size disagrees with the
image (a known quirk) are skipped with a log line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
from PIL import Image

from data_pipelines import schema
from data_pipelines.converters import common

SPLITS = ("train", "validation", "test")
_SPLIT_FILES = {"train": "train.txt", "validation": "val.txt", "test": "test.txt"}
SOURCE = "sirst"


def records(manual_dir: str, split: str) -> Iterator[schema.Record]:
  common.require_dir(os.path.join(manual_dir, "images"), SOURCE)
  ids = common.read_lines(os.path.join(manual_dir, "idx_427", _SPLIT_FILES[split]), SOURCE)
  missing = []
  for sid in ids:
    image_path = os.path.join(manual_dir, "images", f"{sid}.png")
    mask_path = os.path.join(manual_dir, "masks", f"{sid}_pixels0.png")
    if not (os.path.exists(image_path) and os.path.exists(mask_path)):
      missing.append(sid)
      continue
    image = common.read_bytes(image_path)
    width, height = common.image_size(image)
    with Image.open(mask_path) as m:
      mask = np.asarray(m.convert("L")) > 0
    if mask.shape != (height, width):
      common.skip(SOURCE, sid, f"mask {mask.shape[1]}x{mask.shape[0]} but image "
                  f"{width}x{height}")
      continue
    if not mask.any():
      common.skip(SOURCE, sid, "empty mask")
      continue
    phrase = "small target"
    yield common.segmentation(f"{SOURCE}-{sid}-seg", image, "infrared", SOURCE,
                              phrase if _num_components(mask) == 1 else "small targets", mask)
    xml_path = os.path.join(manual_dir, "masks", f"{sid}.xml")
    if os.path.exists(xml_path):
      boxes = [b for b in (common.clip_box(o.box, width, height)
                           for o in common.read_voc(xml_path).objects) if b]
      if 0 < len(boxes) <= schema.MAX_ANSWER_BOXES:
        yield common.grounding(f"{SOURCE}-{sid}-box", image, "infrared", SOURCE,
                               f"the {phrase}" if len(boxes) == 1 else phrase, boxes,
                               width, height)
  common.report_missing(SOURCE, missing, len(ids))


def _num_components(mask: np.ndarray) -> int:
  from scipy import ndimage  # pylint: disable=import-outside-toplevel (scipy comes with jax)
  return int(ndimage.label(mask)[1])
