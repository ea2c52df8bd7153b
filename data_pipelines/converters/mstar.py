"""MSTAR (SAR vehicle chips), the 10-class list-file layout of mstar_deeplearning_project.

Layout: `train.txt` / `val.txt` with lines `<class index>/<file> <label>` (val writes `\\`),
images under `train/` and `val/`. Class indices are not named in the source; by per-class
counts they match the standard 10-class set in alphabetical order (`CLASS_NAMES`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from data_pipelines import schema
from data_pipelines.converters import common

SPLITS = ("train", "validation")
_SPLIT_NAMES = {"train": "train", "validation": "val"}
SOURCE = "mstar"
CLASS_NAMES = ("2S1", "BMP2", "BRDM_2", "BTR60", "BTR70", "D7", "T62", "T72", "ZIL131",
               "ZSU_23_4")


def records(manual_dir: str, split: str) -> Iterator[schema.Record]:
  name = _SPLIT_NAMES[split]
  common.require_dir(os.path.join(manual_dir, name), SOURCE)
  lines = [line.split() for line in common.read_lines(os.path.join(manual_dir, f"{name}.txt"),
                                                      SOURCE)]
  for parts in lines:
    rel, label = parts[0].replace("\\", "/"), int(parts[1])
    path = os.path.join(manual_dir, name, rel)
    if not os.path.exists(path):
      continue  # the list is the full dataset; a subset may be on disk
    if not 0 <= label < len(CLASS_NAMES):
      common.skip(SOURCE, rel, f"label {label} not in 0..{len(CLASS_NAMES) - 1}")
      continue
    yield common.classify_scene(f"{SOURCE}-{name}-{rel.replace('/', '_')}",
                                common.read_bytes(path), "sar", SOURCE, CLASS_NAMES[label],
                                "Which vehicle class is the target in this SAR chip?")
