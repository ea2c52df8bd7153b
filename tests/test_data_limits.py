"""The presets' static slots and the converters' limits agree: real HIT-UAV / HRSID builds are
usable in full by the tiny preset, and a config whose slots are too small fails at start-up
with one line naming the setting and the value that fits (not 20% of the data skipped); the
bad-record reasons are documented."""

import collections
import json
import os
import shutil
import subprocess
import sys

import pytest

from configs import fusion
from data_pipelines import builders, examples, pipeline, schema, slots, tokenizer_training
from earthgptx_jax import tokenizer as tokenizer_lib
from tests.data_fixtures import make_test_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> folder under shared/data
REAL = {"hit_uav": "HIT-UAV", "hrsid": "HRSID_official_samples"}


@pytest.fixture(scope="module")
def built(shared_data, tmp_path_factory):
  """`data_pipelines.build` of each real sample, run as a user would: relative paths from a
  temporary working directory. -> (data dir, {name: CLI stdout})."""
  cwd = tmp_path_factory.mktemp("build")
  os.symlink(shared_data, cwd / "shared")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  out = {}
  for name, folder in REAL.items():
    run = subprocess.run([sys.executable, "-m", "data_pipelines.build", "--dataset", name,
                          "--manual_dir", f"shared/{folder}", "--data_dir", "data"],
                         cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    out[name] = run.stdout
  return cwd / "data", out


def _records(builder):
  return {split: builder.as_data_source(split=split) for split in sorted(builder.info.splits)}


def test_presets_hold_what_the_converters_write():
  for preset in ("paper", "paper13b", "gpu1b", "tiny"):
    config = fusion.get_config(preset)
    assert config.model.box.max_boxes >= schema.MAX_ANSWER_BOXES, preset
    assert config.model.prompt.max_prompts >= 1 and config.model.pixel.max_seg >= 1, preset


def test_tiny_uses_every_real_record(built):
  data_dir, stdout = built
  config = fusion.get_config("tiny")
  assert config.model.box.head
  sources = {name: _records(builders.get_builder(name, str(data_dir))) for name in REAL}
  texts = [t.decode() for splits in sources.values() for src in splits.values()
           for i in range(len(src)) for t in src[i]["turns"]]
  processor = examples.ExampleProcessor(config, make_test_tokenizer(texts))
  most_boxes = 0
  for name, splits in sources.items():
    for split, src in splits.items():
      outcomes = collections.Counter()
      for i in range(len(src)):
        try:
          example = processor.process(src[i])
        except schema.BadRecordError as e:
          outcomes[e.reason] += 1
          continue
        outcomes["usable"] += 1
        most_boxes = max(most_boxes, int(example["box_valid"].sum()))
      assert outcomes == {"usable": len(src)}, (name, split, outcomes)
      # The stats beside the data describe the stored records.
      s = builders.read_stats(builders.get_builder(name, str(data_dir)))[split]
      assert s["num_records"] == len(src) == sum(s["tasks"].values())
      assert s["max_answer_boxes"] <= config.model.box.max_boxes
      assert f"{name} {split}: {len(src)} records" in stdout[name]
  # The densest real answers fill every slot: tiny's max_boxes is what the converters need.
  assert most_boxes == schema.MAX_ANSWER_BOXES == config.model.box.max_boxes
  slots.check_slots(_config_reading(data_dir, "hit_uav"))  # no error at the preset's slots


def _prepare(config):
  """What training does before it reads data: the tokenizer, the config completed from it."""
  tokenizer = tokenizer_training.ensure_tokenizer(config)
  return pipeline.prepare(tokenizer_lib.complete_config(config, tokenizer), tokenizer)


def _config_reading(data_dir, dataset, **model):
  config = fusion.get_config("tiny")
  config.data.data_dir = str(data_dir)
  config.data.sources = {dataset: dict(dataset=dataset, weight=1.0)}
  config.data.train_split = config.data.eval_split = "test"
  config.train.alignment_steps = 0  # no image-level tasks in these sources
  for path, value in model.items():
    section, key = path.split("__")
    config.model[section][key] = value
  return config


def test_too_few_slots_fail_at_start_up_with_the_value_that_fits(built, tmp_path):
  data_dir, _ = built
  tokenizer = tmp_path / "tokenizer"
  make_test_tokenizer(["a ship"], vocab_size=300).save_pretrained(tokenizer)
  config = _config_reading(data_dir, "hit_uav", box__max_boxes=2)
  config.model.llm.tokenizer_path = str(tokenizer)  # nothing else to build
  with pytest.raises(ValueError) as error:  # slots.SlotLimitError, before any training
    _prepare(config)
  assert str(error.value) == ("model.box.max_boxes=2 but dataset hit_uav/test has answers with "
                              "up to 10 boxes: set --config.model.box.max_boxes=10")
  # Every slot is checked, each with its own fix, in one line.
  config = _config_reading(data_dir, "hrsid", box__max_boxes=3, pixel__max_seg=0,
                           prompt__max_prompts=0)
  with pytest.raises(slots.SlotLimitError) as error:
    slots.check_slots(config)
  message = str(error.value)
  assert "\n" not in message
  assert "set --config.model.box.max_boxes=10" in message  # hrsid/test has a 10-ship chip
  assert "model.pixel.max_seg=0 but dataset hrsid/test has records with up to 1 [SEG] masks: " \
         "set --config.model.pixel.max_seg=1" in message
  assert "set --config.model.prompt.max_prompts=1" not in message  # hrsid has no prompts
  # With the box head off, boxes stay text: no box slots to fill.
  config = _config_reading(data_dir, "hit_uav", box__max_boxes=2, box__head=False)
  slots.check_slots(config)


def test_tiny_trains_on_real_hit_uav_without_skipping_records(built, tmp_path):
  """The issue's run: the tiny preset's train iterator over the real HIT-UAV build read past
  data.bad_check_min_records and aborted (59 of 273 records too_many with 2 box slots)."""
  data_dir, _ = built
  src = builders.get_builder("hit_uav", str(data_dir)).as_data_source(split="test")
  tokenizer = tmp_path / "tokenizer"
  make_test_tokenizer([t.decode() for i in range(len(src)) for t in src[i]["turns"]]
                      ).save_pretrained(tokenizer)
  config = _config_reading(data_dir, "hit_uav")
  config.model.llm.tokenizer_path = str(tokenizer)
  config.train.alignment_steps = 200
  config.data.alignment_tasks = ("scene_classification", "image_caption")
  # An alignment stage of image-level tasks, which HIT-UAV has none of: said at start-up (its
  # task filter would otherwise wait forever for a first record).
  with pytest.raises(ValueError, match=r"train.alignment_steps=200 but no source \(\['hit_uav'\]\)"
                     r" has test records of data.alignment_tasks .*alignment_steps=0"):
    _prepare(config)
  config.train.alignment_steps = 0
  data = _prepare(config)
  it = data.train_iterator()
  batches = config.data.bad_check_min_records // config.train.batch_size + 5
  for _ in range(batches):
    batch = next(it)
  assert it.bad_records == {} and it.good_records == batches * config.train.batch_size
  assert batch["box_targets"].shape == (config.train.batch_size, schema.MAX_ANSWER_BOXES, 4)


def test_datasets_built_before_the_stats_warn_and_build_adds_them(built, tmp_path, caplog):
  data_dir, _ = built
  old = tmp_path / "data"
  shutil.copytree(data_dir, old)
  builder = builders.get_builder("hit_uav", str(old))
  stats_file = os.path.join(builder.data_dir, builders.STATS_FILE)
  with open(stats_file, encoding="utf-8") as f:
    written = json.load(f)["splits"]
  os.remove(stats_file)
  mtime = os.path.getmtime(os.path.join(builder.data_dir, "dataset_info.json"))
  config = _config_reading(old, "hit_uav", box__max_boxes=2)
  slots.check_slots(config)  # not checked ...
  assert f"has no {builders.STATS_FILE}" in caplog.text  # ... and said so, with the command
  assert "python -m data_pipelines.build --dataset hit_uav" in caplog.text
  builders.build("hit_uav", str(old), manual_dir="/nonexistent")  # complete: reads, no rebuild
  assert builders.read_stats(builder) == written
  assert os.path.getmtime(os.path.join(builder.data_dir, "dataset_info.json")) == mtime
  with pytest.raises(slots.SlotLimitError, match="max_boxes=10"):
    slots.check_slots(config)


def test_every_bad_record_reason_is_documented():
  with open(os.path.join(ROOT, "data_pipelines", "README.md"), encoding="utf-8") as f:
    readme = f.read()
  section = readme[readme.index("## Bad records"):readme.index("## Static slots")]
  assert [r for r in schema.BAD_REASONS if r not in section] == []
