"""User-given paths, resolved once where they enter: relative to the current directory.

Orbax (and anything that runs in another directory later) needs absolute paths, so every entry
point resolves its path flags and the config's path fields before using them: `~` is expanded,
a relative local path is made absolute against the current directory, and a URL (`gs://...`,
any `scheme://`) is left as it is.
"""

from __future__ import annotations

import os
import re

import ml_collections
from absl import flags

# The config fields that are paths (configs/fusion.py), as dotted names. Unset (None) ones and
# fields a config lacks are skipped.
CONFIG_PATH_FIELDS = (
    "data.data_dir",
    "model.llm.pretrained_path",
    "model.llm.tokenizer_path",
    "model.vision.convnext.pretrained_path",
    "model.vision.dino.pretrained_path",
    "model.pixel.pretrained_path",
    "train.compilation_cache_dir",
)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def resolve(path: str | os.PathLike) -> str:
  """Absolute local path (`~` expanded, relative to the current directory); URLs unchanged."""
  path = os.fspath(path)
  if _URL.match(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def resolve_config_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Resolves CONFIG_PATH_FIELDS of `config` in place (those that are set); returns it."""
  for dotted in CONFIG_PATH_FIELDS:
    *parents, name = dotted.split(".")
    node = config
    for key in parents:
      node = node.get(key, None)
      if node is None:
        break
    if node is None or not node.get(name, None):
      continue
    node[name] = resolve(node[name])
  return config


def resolve_flags(*names: str) -> None:
  """Resolves the named absl string flags in place (those that are set)."""
  for name in names:
    value = flags.FLAGS[name].value
    if value:
      flags.FLAGS[name].value = resolve(value)
