"""Caption datasets: RSICD, UCM-captions, Sydney-captions, NWPU-Captions (shared parsing).

Formats:
  * Karpathy-style `dataset_*.json` (RSICD, UCM-, Sydney-captions releases):
    {"images": [{"filename", "split": train|val|test, "sentences": [{"raw"}, ...]}, ...]};
  * per-split `{split}.json` = {filename: [captions]} with `<start_seq> ... <end_seq>` markers
    (the RSICD preparation of image-caption-remote-sensing-images);
  * NWPU-Captions `dataset_nwpu.json`: {class: [{"filename", "split", "raw", "raw_1", ...}]},
    images under `<class>/<filename>`.
One record per (image, caption), id `<source>-<image stem>-<k>`: evaluation pools the
references of an image (its records carry the same image bytes; `evaluation.image_group`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator

from data_pipelines import schema
from data_pipelines.converters import ConversionError, common

SPLITS = ("train", "validation", "test")
_KARPATHY_SPLIT = {"train": "train", "val": "validation", "test": "test"}
_MARKERS = re.compile(r"<start_seq>|<end_seq>")


def clean(caption: str) -> str:
  text = " ".join(_MARKERS.sub(" ", caption).split())
  return re.sub(r"\s+([.,])", r"\1", text).strip()


def karpathy(path: str, split: str) -> Iterator[tuple[str, list[str]]]:
  for image in common.read_json(path)["images"]:
    if _KARPATHY_SPLIT.get(image.get("split"), "train") == split:
      yield image["filename"], [s["raw"] for s in image["sentences"]]


def per_split_file(path: str) -> Iterator[tuple[str, list[str]]]:
  yield from common.read_json(path).items()


def nwpu(path: str, split: str) -> Iterator[tuple[str, list[str]]]:
  for cls, images in common.read_json(path).items():
    for image in images:
      if _KARPATHY_SPLIT.get(image.get("split"), "train") == split:
        raws = [image[k] for k in sorted(image) if k == "raw" or k.startswith("raw_")]
        yield os.path.join(cls, image["filename"]), raws


def caption_records(source: str, image_dir: str, items: Iterable[tuple[str, list[str]]],
                    modality: str = "optical") -> Iterator[schema.Record]:
  common.require_dir(image_dir, source)
  missing, listed = [], 0
  for filename, captions in items:
    listed += 1
    path = os.path.join(image_dir, filename)
    if not os.path.exists(path):
      missing.append(filename)
      continue
    image = common.read_bytes(path)
    stem = os.path.splitext(filename.replace(os.sep, "_"))[0]
    for k, text in enumerate(clean(c) for c in captions):
      if text:
        yield common.caption(f"{source}-{stem}-{k}", image, modality, source, text)
  common.report_missing(source, missing, listed)


def find(manual_dir: str, *candidates: str) -> str:
  for c in candidates:
    if os.path.exists(os.path.join(manual_dir, c)):
      return os.path.join(manual_dir, c)
  raise ConversionError(f"{manual_dir}: none of {candidates} found")
