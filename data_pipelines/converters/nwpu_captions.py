"""NWPU-Captions: `dataset_nwpu.json` ({class: [{filename, split, raw, raw_1..raw_4}]}) and
the NWPU-RESISC45 images under `<class>/<filename>`."""

from __future__ import annotations

import os
from collections.abc import Iterator

from data_pipelines import schema
from data_pipelines.converters import captions

SPLITS = captions.SPLITS
SOURCE = "nwpu_captions"


def records(manual_dir: str, split: str) -> Iterator[schema.Record]:
  path = captions.find(manual_dir, "dataset_nwpu.json")
  image_dir = os.path.join(manual_dir, "NWPU-RESISC45")
  if not os.path.isdir(image_dir):
    image_dir = manual_dir
  yield from captions.caption_records(SOURCE, image_dir, captions.nwpu(path, split))
