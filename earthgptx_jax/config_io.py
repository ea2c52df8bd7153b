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


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """The ConfigDict saved as JSON at `path`. Raises OSError / json.JSONDecodeError as is: the
  caller names the flag the path came from."""
  with open(path) as f:
    return tuples_from_lists(ml_collections.ConfigDict(json.load(f)))
