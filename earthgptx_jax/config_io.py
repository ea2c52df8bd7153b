"""A run's saved config.json read back as the ConfigDict it was written from.

JSON has no tuples, so the config's tuple fields (mesh shape, frozen patterns, ...) come back as
lists; `load_config` turns them back, so a restored config equals the one the run used.
"""

from __future__ import annotations

import json
import os

import ml_collections


def tuples_from_lists(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Every list in `config` (nested) becomes a tuple, in place; returns `config`."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      tuples_from_lists(value)
    elif isinstance(value, list):
      with config.ignore_type():
        config[key] = tuple(value)
  return config


# Fields the base config gained after runs were saved with it, and the value that builds what
# those runs built: a workdir or export written before keeps loading.
ADDED_FIELDS = {"model.vision.convnext.stem_type": "patch"}


def with_added_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Sets every ADDED_FIELDS entry `config` lacks (where its parent exists), in place."""
  for dotted, value in ADDED_FIELDS.items():
    *parents, name = dotted.split(".")
    node = config
    for part in parents:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if isinstance(node, ml_collections.ConfigDict) and name not in node:
      node[name] = value
  return config


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """The ConfigDict saved as JSON at `path`, with the fields added since (ADDED_FIELDS).
  Raises OSError / json.JSONDecodeError as is: the caller names the flag the path came from."""
  with open(path) as f:
    return with_added_fields(tuples_from_lists(ml_collections.ConfigDict(json.load(f))))
