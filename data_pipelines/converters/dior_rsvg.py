"""DIOR-RSVG: optical visual grounding, a referring expression per object (VOC XML).

Layout (as published): `Annotations/*.xml` (VOC with a `<description>` per object),
`JPEGImages/*.jpg`, and `train.txt` / `val.txt` / `test.txt` listing object indices: the
objects of all XML files in sorted file order, counted from 0 (the RSVG loader's rule).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from data_pipelines import schema
from data_pipelines.converters import common

SPLITS = ("train", "validation", "test")
_SPLIT_FILES = {"train": "train.txt", "validation": "val.txt", "test": "test.txt"}
SOURCE = "dior_rsvg"


def records(manual_dir: str, split: str) -> Iterator[schema.Record]:
  ann_dir = common.require_dir(os.path.join(manual_dir, "Annotations"), SOURCE)
  wanted = {int(v) for v in common.read_lines(os.path.join(manual_dir, _SPLIT_FILES[split]),
                                                SOURCE)}
  index = 0
  for name in sorted(n for n in os.listdir(ann_dir) if n.endswith(".xml")):
    voc = common.read_voc(os.path.join(ann_dir, name))
    image = None
    for obj in voc.element.findall("object"):
      index += 1
      if index - 1 not in wanted:
        continue
      description = (obj.findtext("description") or "").strip()
      if not description or obj.find("bndbox") is None:
        common.skip(SOURCE, f"{name} object {index - 1}", "no description or box")
        continue
      if image is None:
        image = common.read_bytes(os.path.join(manual_dir, "JPEGImages", voc.filename))
        width, height = common.image_size(image)
      box = common.clip_box(common.voc_box(obj.find("bndbox")), width, height)
      if box is None:
        common.skip(SOURCE, f"{name} object {index - 1}", "box outside the image")
        continue
      phrase = description[0].lower() + description[1:]
      yield common.grounding(f"{SOURCE}-{index - 1}", image, "optical", SOURCE, phrase, [box],
                             width, height)
