"""Builds one dataset as TFDS ArrayRecord.

  python -m data_pipelines.build --dataset NAME --manual_dir DIR --data_dir DIR

NAME is one of builders.DATASETS: `synthetic_rs/{optical,sar,infrared}` (procedural, sizes
from --config, no manual dir) or a converter name (dior_rsvg, hrsid, hit_uav, sirst, ssdd,
rsicd, ucm_captions, nwpu_captions, rsvqa, scene_folder, mstar, dota) reading the dataset's own
folder as published. Writes `record_stats.json` beside the data (also for a dataset built before
the stats existed: nothing is rebuilt) and prints the records, tasks and the most answer boxes /
prompts / masks of one record per split.
"""

import pathlib

from absl import app, flags
from ml_collections import config_flags

import configs
from data_pipelines import builders
from earthgptx_jax import cli, paths

_DATASET = flags.DEFINE_string("dataset", None, f"one of {builders.DATASETS}", required=True)
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "the dataset's folder (real datasets)")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir to write (default: the "
                                "config's data.data_dir; synthetic data goes to its "
                                "fingerprinted subfolder there)")
# The default names the installed package's file, so the command works from any directory.
_CONFIG = config_flags.DEFINE_config_file(
    "config", f"{pathlib.Path(configs.__file__).parent / 'fusion.py'}:tiny",
    "config (synthetic sizes)")


def main(argv):
  del argv
  cli.quiet_library_logs()
  paths.resolve_flags("manual_dir", "data_dir")
  config = paths.resolve_config_paths(_CONFIG.value)
  name = _DATASET.value
  data_dir = _DATA_DIR.value or config.data.data_dir
  if name.startswith("synthetic_rs/"):
    if _MANUAL_DIR.value:
      raise app.UsageError("--manual_dir: synthetic_rs is generated, it reads no folder")
    with config.unlocked():
      config.data.data_dir = data_dir
    path = builders.ensure_synthetic(data_dir, config)
    builder = builders.get_builder(name, path, synthetic_config=config.data.synthetic)
  else:
    if not _MANUAL_DIR.value:
      raise app.UsageError(f"--manual_dir: required for {name!r} (its folder as published)")
    builder = builders.build(name, data_dir, manual_dir=_MANUAL_DIR.value)
  stats = builders.ensure_stats(builder)
  for split, info in sorted(builder.info.splits.items()):
    s = stats[split]
    print(f"{name} {split}: {info.num_examples} records in {builder.data_dir}; most per record: "
          f"answer boxes {s['max_answer_boxes']}, prompts {s['max_prompts']}, "
          f"masks {s['max_masks']}; tasks {s['tasks']}")


if __name__ == "__main__":
  app.run(main)
