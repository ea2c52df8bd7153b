"""The configured sources (`config.data.sources`): which ones the mixture reads, where each
dataset is stored, and random access to one split of it."""

from __future__ import annotations

import os

import ml_collections

from data_pipelines import builders


def weights(config: ml_collections.ConfigDict) -> dict[str, float]:
  """{source name: weight} of the sources with a positive weight, sorted by name."""
  configured = config.data.sources
  if not configured:
    raise ValueError("data.sources: empty; name at least one dataset with a weight")
  found = {name: float(configured[name].weight) for name in sorted(configured)}
  if any(w < 0 for w in found.values()) or sum(found.values()) <= 0:
    raise ValueError(f"data.sources weights: must be >= 0 with a positive sum, got {found}")
  return {name: w for name, w in found.items() if w > 0}


def data_source(config: ml_collections.ConfigDict, name: str, split: str):
  """Random-access source of source `name`'s stored feature dicts of `split`."""
  dataset = config.data.sources[name].dataset
  return builders.data_source(dataset, split, source_data_dir(config, dataset),
                              synthetic_config=config.data.synthetic)


def source_data_dir(config: ml_collections.ConfigDict, dataset: str) -> str:
  """Where `dataset` is stored: synthetic data under its fingerprint (sizes and generator code),
  others in data_dir."""
  data_dir = os.path.expanduser(config.data.data_dir)
  if dataset.startswith("synthetic_rs/"):
    fingerprint = builders.synthetic_fingerprint(config.data.synthetic)
    return os.path.join(data_dir, f"synthetic_rs_{fingerprint}")
  return data_dir
