"""HRSID: SAR ship chips with instance masks (high-resolution SAR images dataset).

Two layouts are read:
  * the official release: `annotations/{train2017,test2017}.json` (COCO: polygon
    `segmentation`, `bbox` [x, y, w, h]) and `JPEGImages/`;
  * the repository's sample folder: `data/<chip>.png` with `<chip>_instance_id_RGB.png`
    (one colour per ship, black background); chips go to `test` when their sorted position
    is a multiple of 4, else `train`.
Each chip gives referring segmentation (all ships), box grounding and a ship count.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
from PIL import Image

from data_pipelines import rasterize, schema
from data_pipelines.converters import common

SPLITS = ("train", "test")
SOURCE = "hrsid"


def records(manual_dir: str, split: str) -> Iterator[schema.Record]:
  coco = os.path.join(manual_dir, "annotations", f"{split}2017.json")
  if os.path.exists(coco):
    yield from coco_records(coco, os.path.join(manual_dir, "JPEGImages"), "sar", SOURCE, "ship")
    return
  data = common.require_dir(os.path.join(manual_dir, "data"), SOURCE)
  chips = sorted(n[:-4] for n in os.listdir(data)
                 if n.endswith(".png") and not n.endswith("_RGB.png"))
  for position, chip in enumerate(chips):
    if (position % 4 == 0) != (split == "test"):
      continue
    image = common.read_bytes(os.path.join(data, f"{chip}.png"))
    with Image.open(os.path.join(data, f"{chip}_instance_id_RGB.png")) as m:
      masks = instance_masks(np.asarray(m.convert("RGB")))
    yield from _chip_records(chip, image, masks, "sar", SOURCE, "ship")


def instance_masks(id_rgb: np.ndarray) -> list[np.ndarray]:
  """[H, W, 3] colour-coded instances (black background) -> one bool mask per colour."""
  codes = id_rgb.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
  return [codes == c for c in np.unique(codes) if c != 0]


def polygon_mask(polygons, width: int, height: int) -> np.ndarray:
  """COCO polygons [[x1, y1, x2, y2, ...], ...] (pixel edges) -> [H, W] bool, by the
  rasteriser's pixel-centre rule (so a rectangle covers exactly its box)."""
  side = max(width, height)
  identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
  out = np.zeros((height, width), bool)
  for poly in polygons:
    if len(poly) >= 6:
      vertices = np.asarray(poly, np.float64).reshape(-1, 2)
      drawn = rasterize.rasterize(rasterize.Prompt("polygon", coords=vertices), identity, side)
      out |= drawn[:height, :width] > 0
  return out


def coco_records(path: str, image_dir: str, modality: str, source: str, name: str
                 ) -> Iterator[schema.Record]:
  """Records from a COCO instances file whose objects are all of one class `name`."""
  coco = common.read_json(path)
  by_image = {}
  for ann in coco.get("annotations", []):
    by_image.setdefault(ann["image_id"], []).append(ann)
  for info in coco["images"]:
    anns = by_image.get(info["id"], [])
    image_path = os.path.join(image_dir, info["file_name"])
    if not anns or not os.path.exists(image_path):
      common.skip(source, info["file_name"], "no annotations or image file missing")
      continue
    image = common.read_bytes(image_path)
    width, height = common.image_size(image)
    masks = []
    for ann in anns:
      seg = ann.get("segmentation")
      if isinstance(seg, list) and seg:
        mask = polygon_mask(seg, width, height)
      else:  # boxes only: the box is the mask
        x, y, w, h = ann["bbox"]
        mask = polygon_mask([[x, y, x + w, y, x + w, y + h, x, y + h]], width, height)
      if mask.any():
        masks.append(mask)
    yield from _chip_records(os.path.splitext(info["file_name"])[0], image, masks, modality,
                             source, name)


def _chip_records(chip, image, masks, modality, source, name) -> Iterator[schema.Record]:
  width, height = common.image_size(image)
  if masks and masks[0].shape != (height, width):
    common.skip(source, chip, f"mask size {masks[0].shape[::-1]} != image {width}x{height}")
    return
  yield common.counting(f"{source}-{chip}-count", image, modality, source, name, len(masks))
  if not masks:
    return
  phrase = name if len(masks) == 1 else common.plural(name)
  yield common.segmentation(f"{source}-{chip}-seg", image, modality, source, phrase,
                            common.union_mask(masks))
  boxes = [schema.mask_to_box(m) for m in masks]
  if len(boxes) <= schema.MAX_ANSWER_BOXES:
    yield common.grounding(f"{source}-{chip}-box", image, modality, source,
                           f"the {name}" if len(boxes) == 1 else name, boxes, width, height)

