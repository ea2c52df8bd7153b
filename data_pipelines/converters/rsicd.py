"""RSICD: remote-sensing image captioning, 5 captions per image (see captions.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

from data_pipelines import schema
from data_pipelines.converters import captions

SPLITS = captions.SPLITS
SOURCE = "rsicd"
_SPLIT_FILES = {"train": "train.json", "validation": "val.json", "test": "test.json"}


def records(manual_dir: str, split: str) -> Iterator[schema.Record]:
  """`dataset_rsicd.json` + `RSICD_images/`, or the per-split layout
  `src/datasets/RSICD/dataset/<split>.json` + `src/datasets/RSICD/raw_dataset/RSICD_images/`."""
  karpathy = os.path.join(manual_dir, "dataset_rsicd.json")
  if os.path.exists(karpathy):
    yield from captions.caption_records(SOURCE, os.path.join(manual_dir, "RSICD_images"),
                                        captions.karpathy(karpathy, split))
    return
  base = os.path.join(manual_dir, "src", "datasets", "RSICD")
  path = os.path.join(base, "dataset", _SPLIT_FILES[split])
  if not os.path.exists(path):
    return
  yield from captions.caption_records(SOURCE, os.path.join(base, "raw_dataset", "RSICD_images"),
                                      captions.per_split_file(path))
