"""Converters from public remote-sensing datasets' own formats into `schema.Record`s.

Each module reads a dataset's folder exactly as published (`manual_dir`) and provides
`SOURCE` (its dataset name), `SPLITS` (tuple of split names) and
`records(manual_dir, split) -> Iterator[Record]`.
Unusable examples (unreadable files, empty annotations) are skipped with a log line naming
the file and the reason; a folder that is not the dataset raises `ConversionError`.
"""

from __future__ import annotations


class ConversionError(ValueError):
  """The manual dir does not hold the dataset in its documented layout."""

