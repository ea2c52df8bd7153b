"""UCM-captions (and Sydney-captions: same layout): `dataset.json` (Karpathy) + `imgs/`."""

from __future__ import annotations

import os
from collections.abc import Iterator

from data_pipelines import schema
from data_pipelines.converters import captions

SPLITS = captions.SPLITS
SOURCE = "ucm_captions"


def records(manual_dir: str, split: str) -> Iterator[schema.Record]:
  path = captions.find(manual_dir, "dataset.json", "dataset_ucm.json")
  yield from captions.caption_records(SOURCE, captions.find(manual_dir, "imgs", "images"),
                                      captions.karpathy(path, split))
