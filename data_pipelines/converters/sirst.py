"""SIRST: infrared small targets with pixel masks and VOC boxes.

Layout: `images/<id>.png` (RGB / RGBA / grey / palette PNGs of grey IR imagery),
`masks/<id>_pixels0.png` (binary {0, 255}, all targets), `masks/<id>.xml` (VOC),
`idx_427/{train,val,test}.txt` (ids). Each image gives a referring-segmentation record (the
mask) and a box-grounding record naming every target. The targets are the mask's 8-connected
components: the XML holds one object per mask file, whose box spans all of its targets (in 14
of the 99 sample images the mask has 2 to 6 separate targets), so it is not read. Images whose
mask size disagrees with the image (a known quirk) are skipped with a log line.
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
    boxes = target_boxes(mask)
    phrase = "small target" if len(boxes) == 1 else "small targets"
    yield common.segmentation(f"{SOURCE}-{sid}-seg", image, "infrared", SOURCE, phrase, mask)
    if len(boxes) > schema.MAX_ANSWER_BOXES:
      common.skip(SOURCE, f"{sid} (grounding)", f"{len(boxes)} targets > "
                  f"schema.MAX_ANSWER_BOXES={schema.MAX_ANSWER_BOXES}")
      continue
    yield common.grounding(f"{SOURCE}-{sid}-box", image, "infrared", SOURCE,
                           "the small target" if len(boxes) == 1 else "small target", boxes,
                           width, height)
  common.report_missing(SOURCE, missing, len(ids))


def target_boxes(mask: np.ndarray) -> list[tuple[float, float, float, float]]:
  """[H, W] bool -> the tight pixel-edge box of each 8-connected component (one per target)."""
  from scipy import ndimage  # pylint: disable=import-outside-toplevel (scipy comes with jax)
  labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
  return [(float(xs.start), float(ys.start), float(xs.stop), float(ys.stop))
          for ys, xs in ndimage.find_objects(labels)]
