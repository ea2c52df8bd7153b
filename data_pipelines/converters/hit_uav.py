"""HIT-UAV: infrared thermal UAV images with Person / Car / Bicycle / OtherVehicle boxes.

Layout (as published): `normal_xml/{Annotations,JPEGImages,ImageSets/Main/<split>.txt}`
(VOC) and `normal_json/annotations/<split>.json`, COCO-like but not COCO: the annotation list
is under `annotation` (singular) and images name their file in `filename`. The VOC files are
read; `read_json` parses the JSON variant (same boxes, used to cross-check). `DontCare`
regions are dropped. Each image gives, per class present, a count and (up to
`schema.MAX_ANSWER_BOXES` objects) a box grounding, and a referring classification of its first
object.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

from data_pipelines import schema
from data_pipelines.converters import common

SPLITS = ("train", "validation", "test")
_SPLIT_FILES = {"train": "train.txt", "validation": "val.txt", "test": "test.txt"}
SOURCE = "hit_uav"
IGNORED = ("DontCare",)


def class_phrase(name: str) -> str:
  """`OtherVehicle` -> `other vehicle`, `Person` -> `person`."""
  return re.sub(r"(?<!^)(?=[A-Z])", " ", name).lower()


def records(manual_dir: str, split: str) -> Iterator[schema.Record]:
  root = common.require_dir(os.path.join(manual_dir, "normal_xml"), SOURCE)
  stems = common.read_lines(os.path.join(root, "ImageSets", "Main", _SPLIT_FILES[split]),
                            SOURCE)
  missing = []
  for stem in stems:
    xml_path = os.path.join(root, "Annotations", f"{stem}.xml")
    image_path = os.path.join(root, "JPEGImages", f"{stem}.jpg")
    if not (os.path.exists(xml_path) and os.path.exists(image_path)):
      missing.append(stem)
      continue
    image = common.read_bytes(image_path)
    width, height = common.image_size(image)
    objects = [common.Box(o.name, b) for o in common.read_voc(xml_path).objects
               if o.name not in IGNORED and (b := common.clip_box(o.box, width, height))]
    yield from image_records(stem, image, objects, width, height)
  common.report_missing(SOURCE, missing, len(stems))


def image_records(stem, image, objects, width, height) -> Iterator[schema.Record]:
  by_class = {}
  for obj in objects:
    by_class.setdefault(obj.name, []).append(obj.box)
  for name, boxes in sorted(by_class.items()):
    phrase = class_phrase(name)
    yield common.counting(f"{SOURCE}-{stem}-count-{name}", image, "infrared", SOURCE, phrase,
                          len(boxes))
    if len(boxes) <= schema.MAX_ANSWER_BOXES:
      yield common.grounding(f"{SOURCE}-{stem}-box-{name}", image, "infrared", SOURCE,
                             f"the {phrase}" if len(boxes) == 1 else phrase, boxes, width,
                             height)
  if objects:
    yield common.classify_region(f"{SOURCE}-{stem}-cls", image, "infrared", SOURCE,
                                 objects[0].box, class_phrase(objects[0].name))


def read_json(path: str) -> dict[str, list[common.Box]]:
  """HIT-UAV JSON -> {file name: [Box]} (COCO-like `bbox` [x, y, w, h], key `annotation`)."""
  data = common.read_json(path)
  names = {c["id"]: c["name"] for c in data["categories"]}
  files = {img["id"]: img["filename"] for img in data["images"]}
  out = {f: [] for f in files.values()}
  for ann in data["annotation"]:
    x, y, w, h = (float(v) for v in ann["bbox"])
    out[files[ann["image_id"]]].append(common.Box(names[ann["category_id"]], (x, y, x + w, y + h)))
  return out
