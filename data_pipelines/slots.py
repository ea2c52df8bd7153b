"""The model's static slots (answer boxes, visual prompts, [SEG] masks per example) checked
against the stored data at start-up, from the `record_stats.json` each build writes: a
data / config mismatch is one line naming the setting and the value that fits, not records
skipped as `too_many` mid-training."""

from __future__ import annotations

import logging

import ml_collections

from data_pipelines import builders, sources


class SlotLimitError(ValueError):
  """A dataset's records need more static slots (answer boxes, prompts, masks) than the
  model's config gives: a data / config mismatch, found at start-up."""


# Per-record statistics (builders.split_stats) and the config slot that must hold each.
_SLOTS = (("max_answer_boxes", "model.box.max_boxes", "answers with up to {} boxes"),
          ("max_prompts", "model.prompt.max_prompts", "records with up to {} visual prompts"),
          ("max_masks", "model.pixel.max_seg", "records with up to {} [SEG] masks"))


def check_slots(config: ml_collections.ConfigDict) -> None:
  """Raises SlotLimitError (one line: the setting, the dataset that overflows it, the value that
  fits) when a source's stored records need more answer boxes / prompts / [SEG] masks than the
  model's static slots; such records would otherwise be skipped as `too_many` mid-training.
  Also raises (ValueError) when an alignment stage is asked for but no source's train split
  has a record of `data.alignment_tasks` (its filter would wait forever).

  Reads each source's `record_stats.json` (train and eval splits). A dataset built before the
  stats existed is not checked: a warning says how to add them.
  """
  limits = {"model.box.max_boxes": int(config.model.box.max_boxes),
            "model.prompt.max_prompts": int(config.model.prompt.max_prompts),
            "model.pixel.max_seg": int(config.model.pixel.max_seg)}
  if not config.model.box.head:  # boxes stay text: no [BOX] slots are filled
    del limits["model.box.max_boxes"]
  stats = source_stats(config)
  worst = {}  # setting -> (needed, "dataset/split")
  for dataset, splits in stats.items():
    for split in dict.fromkeys((config.data.train_split, config.data.eval_split)):
      for key, setting, _ in _SLOTS:
        needed = int((splits or {}).get(split, {}).get(key, 0))
        if setting in limits and needed > worst.get(setting, (limits[setting], ""))[0]:
          worst[setting] = (needed, f"{dataset}/{split}")
  messages = []
  for _, setting, what in _SLOTS:
    if setting in worst:
      needed, where = worst[setting]
      messages.append(f"{setting}={limits[setting]} but dataset {where} has "
                      f"{what.format(needed)}: set --config.{setting}={needed}")
  if messages:
    raise SlotLimitError("; ".join(messages))
  alignment_steps = int(config.train.get("alignment_steps", 0) or 0)
  tasks = tuple(config.data.alignment_tasks)
  split = config.data.train_split
  if alignment_steps > 0 and stats and None not in stats.values() and not sum(
      s.get(split, {}).get("tasks", {}).get(t, 0) for s in stats.values() for t in tasks):
    raise ValueError(f"train.alignment_steps={alignment_steps} but no source ({sorted(stats)}) "
                     f"has {split} records of data.alignment_tasks {tasks}: set "
                     "--config.train.alignment_steps=0 or add a source with those tasks")


def source_stats(config: ml_collections.ConfigDict) -> dict[str, dict | None]:
  """{dataset: its record_stats ({split: stats})} of every built source with weight > 0; None
  (logged) for a dataset built before the stats existed. Unbuilt ones are left out: reading
  them raises the error that names the build command."""
  out = {}
  for name in sources.weights(config):
    dataset = config.data.sources[name].dataset
    data_dir = sources.source_data_dir(config, dataset)
    builder = builders.get_builder(dataset, data_dir, synthetic_config=config.data.synthetic)
    if not builder.is_prepared():
      continue
    out[dataset] = builders.read_stats(builder)
    if out[dataset] is None:
      logging.warning(
          "dataset %s under %s has no %s (built before the stats existed): its records are "
          "not checked against the config; add them with `python -m data_pipelines.build "
          "--dataset %s --manual_dir DIR --data_dir %s` (reads the stored records, rebuilds "
          "nothing)", dataset, data_dir, builders.STATS_FILE, dataset, data_dir)
  return out
