"""TFDS builders writing schema records to ArrayRecord, and the registry the pipeline reads.

Every dataset is a `tfds.core.GeneratorBasedBuilder` whose examples are `schema.to_features`
of `schema.Record`s, written with `file_format="array_record"` (random access for grain,
no TensorFlow needed: images are stored as encoded bytes). Names are `dataset` or
`dataset/config` as in TFDS, e.g. `synthetic_rs/sar`, `dior_rsvg`, `scene_folder/ucm`.

  synthetic_rs/{optical,sar,infrared}  procedural data (synthetic.py); no manual dir
  <converter>                          a real public format read from `manual_dir`
                                       (data_pipelines/converters/, one module each)

Beside the data, `record_stats.json` holds per-split statistics of the stored records (counts
per task, the most answer boxes / visual prompts / [SEG] masks in one record); `build` and
`ensure_synthetic` write it, and `pipeline.prepare` checks the model's static slots against it.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import io
import itertools
import json
import logging
import os
import sys
from collections.abc import Iterator

import ml_collections
import tensorflow_datasets as tfds
from etils import epath

from data_pipelines import converters, schema, synthetic
from data_pipelines.converters import (dior_rsvg, dota, hit_uav, hrsid, mstar, nwpu_captions,
                                       rsicd, rsvqa, scene_folder, sirst, ssdd, ucm_captions)
from earthgptx_jax import template

_FILE_FORMAT = "array_record"
STATS_FILE = "record_stats.json"


class RecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base: subclasses yield `schema.Record`s per split from `_records(split)`."""

  VERSION = tfds.core.Version("1.0.0")
  SPLIT_NAMES: tuple[str, ...] = ("train",)
  # No checksums file: nothing is downloaded. (Also sidesteps TFDS resolving the package path
  # through `importlib_resources`, which it does not declare as a dependency.)
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=schema.feature_spec(),
                                 description=(self.__doc__ or "").strip())

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self.SPLIT_NAMES}

  def _generate_examples(self, split: str):
    for record in self._records(split):
      yield record.id, schema.to_features(record)

  def _records(self, split: str) -> Iterator[schema.Record]:
    raise NotImplementedError


class SyntheticRsConfig(tfds.core.BuilderConfig):
  """One sensor of `synthetic_rs`."""

  def __init__(self, *, modality: str, **kwargs):
    super().__init__(name=modality, **kwargs)
    self.modality = modality


class SyntheticRs(RecordBuilder, skip_registration=True):
  """Procedural multi-source remote-sensing scenes (optical / SAR / infrared), all tasks."""

  name = "synthetic_rs"
  SPLIT_NAMES = synthetic.SPLITS
  BUILDER_CONFIGS = [SyntheticRsConfig(modality=m) for m in schema.MODALITIES]

  def __init__(self, *, synthetic_config: ml_collections.ConfigDict, **kwargs):
    self._synthetic = synthetic_config  # config.data.synthetic
    super().__init__(**kwargs)
    self._original_state["synthetic_config"] = synthetic_config  # TFDS re-inits on unpickle

  def _records(self, split: str) -> Iterator[schema.Record]:
    for index in range(synthetic.num_records(split, self._synthetic)):
      yield synthetic.make_record(self.builder_config.name, split, index, self._synthetic)


class ConverterBuilder(RecordBuilder, skip_registration=True):
  """A real dataset read from `manual_dir` by a converter module of data_pipelines/converters.

  The converter module provides `SPLITS` and `records(manual_dir, split)`.
  """

  CONVERTER = None  # set per subclass
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the dataset's own folder as --manual_dir."

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    splits = {}
    for split in self.SPLIT_NAMES:  # Splits without records (partial copies) are left out.
      records = self.CONVERTER.records(manual_dir, split)
      first = next(records, None)
      if first is None:
        logging.warning("%s: split %r has no records in %s; not written", self.name, split,
                        manual_dir)
        continue
      splits[split] = self._generate_from(itertools.chain([first], records))
    if not splits:
      raise converters.ConversionError(f"{self.name}: no records in any split under "
                                       f"{manual_dir}")
    return splits

  def _generate_from(self, records):
    for record in records:
      yield record.id, schema.to_features(record)


def _converter_builder(name: str, module) -> type[ConverterBuilder]:
  return type(f"_{name}", (ConverterBuilder,), dict(
      CONVERTER=module, SPLIT_NAMES=tuple(module.SPLITS), name=name, __module__=__name__,
      __doc__=(module.__doc__ or name).strip().splitlines()[0]), skip_registration=True)


CONVERTERS = {m.SOURCE: m for m in (dior_rsvg, dota, hit_uav, hrsid, mstar, nwpu_captions, rsicd,
                                    rsvqa, scene_folder, sirst, ssdd, ucm_captions)}
CONVERTER_BUILDERS: dict[str, type[ConverterBuilder]] = {
    name: _converter_builder(name, module) for name, module in CONVERTERS.items()}
DATASETS: tuple[str, ...] = (*(f"synthetic_rs/{m}" for m in schema.MODALITIES),
                             *CONVERTER_BUILDERS)


def get_builder(name: str, data_dir: str, *,
                synthetic_config=None) -> tfds.core.DatasetBuilder:
  """The builder of `name` (one of DATASETS) writing to / reading from `data_dir`."""
  data_dir = os.path.expanduser(os.fspath(data_dir))
  dataset, _, config = name.partition("/")
  if dataset == "synthetic_rs":
    if synthetic_config is None:
      raise ValueError(f"dataset {name!r}: synthetic_config (config.data.synthetic) is required")
    if config not in schema.MODALITIES:
      raise ValueError(f"dataset {name!r}: unknown synthetic_rs config {config!r}; expected "
                       f"one of {schema.MODALITIES}")
    return SyntheticRs(config=config, data_dir=data_dir, file_format=_FILE_FORMAT,
                       synthetic_config=synthetic_config)
  if name not in CONVERTER_BUILDERS:
    raise ValueError(f"dataset: unknown value {name!r}; expected one of {DATASETS}")
  return CONVERTER_BUILDERS[name](data_dir=data_dir, file_format=_FILE_FORMAT)


def build(name: str, data_dir: str, *, manual_dir: str | None = None,
          synthetic_config=None) -> tfds.core.DatasetBuilder:
  """Writes `name` as ArrayRecord under `data_dir` (no-op when already complete)."""
  builder = get_builder(name, data_dir, synthetic_config=synthetic_config)
  config = None
  if manual_dir is not None:
    config = tfds.download.DownloadConfig(manual_dir=os.path.expanduser(manual_dir))
  builder.download_and_prepare(download_config=config)
  ensure_stats(builder)
  return builder


def split_stats(source) -> dict:
  """Statistics of one stored split (a data source of feature dicts): the record count, records
  per task, and the most answer boxes / visual prompts / [SEG] masks in one record (what the
  model's slots model.box.max_boxes / model.prompt.max_prompts / model.pixel.max_seg must hold)."""
  tasks = collections.Counter()
  most = dict(max_answer_boxes=0, max_prompts=0, max_masks=0)
  for i in range(len(source)):
    features = source[i]
    tasks[schema.feature_text(features["task"])] += 1
    turns = [schema.feature_text(t) for t in features["turns"]]
    counts = dict(max_answer_boxes=schema.answer_box_count(turns),
                  max_prompts=len(features["prompt_kind"]), max_masks=len(features["masks"]))
    for key, value in counts.items():
      most[key] = max(most[key], value)
  return dict(num_records=len(source), tasks=dict(sorted(tasks.items())), **most)


def ensure_stats(builder: tfds.core.DatasetBuilder) -> dict:
  """`record_stats.json` of a prepared dataset ({split: split_stats}); written by one read of
  the stored records when absent (datasets built before the stats existed get theirs here)."""
  stats = read_stats(builder)
  if stats is not None:
    return stats
  path = epath.Path(builder.data_dir) / STATS_FILE
  splits = {split: split_stats(builder.as_data_source(split=split))
            for split in sorted(builder.info.splits)}
  tmp = path.parent / f"{STATS_FILE}.tmp-{os.getpid()}"
  tmp.write_text(json.dumps({"version": 1, "splits": splits}, indent=1))
  tmp.replace(path)  # atomic: a reader never sees half a file
  return splits


def read_stats(builder: tfds.core.DatasetBuilder) -> dict | None:
  """{split: split_stats} of a prepared dataset; None when it was built before the stats
  existed (`build` adds them without rebuilding)."""
  path = epath.Path(builder.data_dir) / STATS_FILE
  return json.loads(path.read_text())["splits"] if path.exists() else None


def data_source(name: str, split: str, data_dir: str, *, synthetic_config=None):
  """Random-access source of stored feature dicts (what grain's MapDataset.source takes)."""
  builder = get_builder(name, data_dir, synthetic_config=synthetic_config)
  if not builder.is_prepared():
    raise FileNotFoundError(f"dataset {name!r} is not built under {data_dir}; run "
                            f"`python -m data_pipelines.build --dataset {name} "
                            f"--data_dir {data_dir}` (with --manual_dir for real datasets)")
  if split not in builder.info.splits:
    raise ValueError(f"split: {split!r} not in dataset {name!r}; it has "
                     f"{sorted(builder.info.splits)}")
  return builder.as_data_source(split=split)


# The modules whose code decides synthetic_rs's records, byte for byte.
SYNTHETIC_CODE = (synthetic, schema, template)


def synthetic_fingerprint(synthetic_config) -> str:
  """Short hash of the synthetic sizes and of the generator's code: data generated with other
  sizes, or by an edited synthetic_rs, lives elsewhere instead of being silently reused."""
  digest = hashlib.sha256(json.dumps(synthetic_config.to_dict(), sort_keys=True,
                                     default=str).encode())
  for module in SYNTHETIC_CODE:
    digest.update(epath.Path(module.__file__).read_bytes())
  return digest.hexdigest()[:10]


def ensure_synthetic(data_dir: str, config: ml_collections.ConfigDict) -> str:
  """Generates `synthetic_rs` for `config.data.synthetic` under `data_dir` if absent.

  Returns the TFDS data dir holding `synthetic_rs/{optical,sar,infrared}`:
  `data_dir/synthetic_rs_<synthetic_fingerprint>`. Deterministic by seed: two machines
  write the same records.
  """
  cfg = config.data.synthetic
  tfds.disable_progress_bar()
  path = os.path.join(os.path.expanduser(os.fspath(data_dir)),
                      f"synthetic_rs_{synthetic_fingerprint(cfg)}")
  with exclusive(path):
    for modality in schema.MODALITIES:
      # TFDS's own lines (a warning that a new folder has no dataset_info.json, "Downloading and
      # preparing dataset Unknown size") tell a newcomer something false: nothing is downloaded.
      with contextlib.redirect_stdout(io.StringIO()), _tfds_warnings_off():
        builder = get_builder(f"synthetic_rs/{modality}", path, synthetic_config=cfg)
        if not builder.is_prepared():
          print(f"generating synthetic_rs/{modality} ({cfg.num_train} train + {cfg.num_eval} "
                f"held-out records) under {path}", file=sys.stderr, flush=True)
          builder.download_and_prepare()
      ensure_stats(builder)
  return path


@contextlib.contextmanager
def _tfds_warnings_off():
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


@contextlib.contextmanager
def exclusive(path: str):
  """Holds an exclusive lock on `<path>.lock`: JAX processes of one job all call `prepare`,
  and the first to arrive builds while the others wait, then find the data ready."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(f"{path}.lock", "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)

