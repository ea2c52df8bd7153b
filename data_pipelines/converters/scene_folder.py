"""Folder-per-class scene datasets (UC Merced, NWPU-RESISC45, AID): `<class>/<image>`.

Class folder names become answers (`denseresidential` -> as is; `dense_residential` ->
`dense residential`). Images are sorted per class and every 5th goes to `validation`
(these datasets ship without official splits).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from data_pipelines import schema
from data_pipelines.converters import common

SPLITS = ("train", "validation")
SOURCE = "scene_folder"
_IMAGE_EXTENSIONS = (".tif", ".tiff", ".jpg", ".jpeg", ".png", ".bmp")


def records(manual_dir: str, split: str, *, source: str = SOURCE,
            modality: str = "optical") -> Iterator[schema.Record]:
  root = common.require_dir(manual_dir, source)
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  for cls in classes:
    files = sorted(f for f in os.listdir(os.path.join(root, cls))
                   if f.lower().endswith(_IMAGE_EXTENSIONS))
    for position, name in enumerate(files):
      if (position % 5 == 4) != (split == "validation"):
        continue
      image = common.read_bytes(os.path.join(root, cls, name))
      stem = os.path.splitext(name)[0]
      yield common.classify_scene(f"{source}-{cls}-{stem}", image, modality, source,
                                  cls.replace("_", " ").lower())
