"""The grain pipeline on synthetic_rs: batch contract, template and loss mask, mixing
proportions, resume through Orbax, disjoint process shards, bad-record accounting."""

import collections
import io
import pathlib

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from configs import fusion
from data_pipelines import (bad_records, builders, examples, pipeline, schema, sources, synthetic,
                            tokenizer_training, views)
from earthgptx_jax import batch as batch_lib
from earthgptx_jax import template
from earthgptx_jax import tokenizer as tokenizer_lib
from tests.data_fixtures import make_test_tokenizer


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  config = fusion.get_config("tiny")
  config.data.data_dir = str(tmp_path_factory.mktemp("data"))
  config.data.synthetic.num_train = 90
  config.data.synthetic.num_eval = 12
  config.train.batch_size = 4
  config.train.alignment_steps = 0  # the plain mixture; the staged one has its own test
  builders.ensure_synthetic(config.data.data_dir, config)
  return config


@pytest.fixture(scope="module")
def tokenizer(config):
  return make_test_tokenizer(list(tokenizer_training.synthetic_texts(config)))


def _assert_same_record(a: schema.Record, b: schema.Record):
  fa, fb = schema.to_features(a), schema.to_features(b)
  assert fa.keys() == fb.keys()
  for key in fa:
    np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg=key)


def test_synthetic_records_are_deterministic_and_targets_exact(config):
  cfg = config.data.synthetic
  for modality in schema.MODALITIES:
    a = synthetic.make_record(modality, "train", 7, cfg)
    _assert_same_record(a, synthetic.make_record(modality, "train", 7, cfg))
    assert a.image != synthetic.make_record(modality, "validation", 7, cfg).image
    bands = np.asarray(Image.open(io.BytesIO(a.image))).ndim
    assert bands == (3 if modality == "optical" else 2)
  rng = np.random.default_rng(0)
  for _ in range(20):
    scene = synthetic.make_scene(rng, cfg)
    assert cfg.min_size <= scene.height <= cfg.max_size
    for obj in scene.objects:
      assert obj.mask.shape == (scene.height, scene.width) and obj.mask.any()
      ys, xs = np.nonzero(obj.mask)
      assert obj.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    for i, a in enumerate(scene.objects):  # non-overlapping
      for b in scene.objects[i + 1:]:
        assert not (a.mask & b.mask).any()


def test_synthetic_covers_every_task_prompt_kind_and_valid_targets(config):
  cfg = config.data.synthetic
  tasks, kinds = collections.Counter(), collections.Counter()
  for modality in schema.MODALITIES:
    for index in range(60):
      r = synthetic.make_record(modality, "train", index, cfg)
      w, h = Image.open(io.BytesIO(r.image)).size
      schema.validate(r, w, h)  # raises on any inconsistency
      tasks[r.task] += 1
      kinds.update(p.kind for p in r.prompts)
      if r.task == "box_grounding":
        (box,) = template.parse_coordinates(r.turns[1], w, h).boxes
        assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h
      if r.task == "referring_segmentation":
        assert r.turns[1].count(template.SEG) == len(r.masks) == 1
  assert set(tasks) == set(schema.TASKS)
  assert min(tasks.values()) >= 10  # tasks drawn uniformly: 180 records / 8 tasks
  assert set(kinds) == set(schema.PROMPT_KINDS)


def test_render_conversation_template():
  segs = template.render_conversation(["What is <vp1>?", "a ship", "And <vp2>?", "[SEG]"],
                                      "sar")
  assert [s.is_answer for s in segs] == [False, True, False, True]
  assert segs[0].text == (f"{template.SYSTEM_PROMPT} USER: <image>\nThis is a synthetic "
                          "aperture radar (SAR) image.\nWhat is <vp1>? ASSISTANT:")
  assert segs[1].text == " a ship" and segs[2].text == "USER: And <vp2>? ASSISTANT:"
  pieces = template.split_placeholders("a <image> b <vp2>")
  assert pieces == ["a ", template.Placeholder("image"), " b ", template.Placeholder("vp", 1)]
  assert template.expand_placeholders("<vp1>", 3, 2) == "<vp><vp_patch><vp_patch></vp>"


@pytest.fixture(scope="module")
def first_batches(config, tokenizer):
  it = pipeline.make_train_iterator(config, tokenizer)
  return [next(it) for _ in range(3)]


def test_batches_follow_the_contract(config, tokenizer, first_batches):
  ids = ml_collections.ConfigDict(tokenizer_lib.special_token_ids(tokenizer))
  views_n = 1 + config.model.vision.max_tiles
  per_view = config.model.vision.token_grid ** 2
  k = config.model.prompt.tokens_per_prompt
  for batch in first_batches:
    batch_lib.validate_batch(batch, config, config.train.batch_size)
    for b in range(config.train.batch_size):
      input_ids, loss = batch["input_ids"][b], batch["loss_mask"][b]
      n = int(np.sum(input_ids != ids.pad))
      assert input_ids[0] == ids.bos and not batch["attention_mask"][b, n:].any()
      np.testing.assert_array_equal(batch["targets"][b, :n - 1], input_ids[1:n])
      # The loss covers exactly the answer and its EOS, which ends the sequence.
      answer = batch["targets"][b][loss]
      assert answer[-1] == ids.eos and np.flatnonzero(loss)[-1] == n - 2
      assert ids.image_patch not in answer and ids.vp_patch not in answer
      # Image tokens: all views; those of padding views are masked out of attention.
      patch = np.flatnonzero(input_ids == ids.image_patch)
      assert len(patch) == views_n * per_view
      visible = batch["attention_mask"][b, patch].reshape(views_n, per_view)
      np.testing.assert_array_equal(visible.all(1), batch["view_valid"][b])
      # Prompt tokens: p * K + j at the K tokens of <vp{p+1}>.
      vp = batch["vp_token_index"][b]
      np.testing.assert_array_equal(vp >= 0, input_ids == ids.vp_patch)
      num_prompts = int(batch["prompt_valid"][b].sum())
      assert set(vp[vp >= 0].tolist()) <= set(range(num_prompts * k))
      # One valid mask per [SEG] in the answer.
      assert int(np.sum(answer == ids.seg)) == int(batch["seg_valid"][b].sum())
      assert batch["seg_masks"][b][~batch["seg_valid"][b]].sum() == 0
      assert all(batch["seg_masks"][b][q].sum() > 0
                 for q in np.flatnonzero(batch["seg_valid"][b]))


def test_answer_and_seg_mask_match_the_stored_record(config, tokenizer):
  source = sources.data_source(config, "synthetic_optical", "train")
  processor = examples.ExampleProcessor(config, tokenizer)
  seen = 0
  for i in range(len(source)):
    record = schema.from_features(source[i])
    if record.task != "referring_segmentation":
      continue
    example = processor.process(source[i])
    answer = tokenizer.decode(example["targets"][example["loss_mask"]])
    assert answer == " " + record.turns[1] + tokenizer.eos_token
    img = np.asarray(Image.open(io.BytesIO(record.image)))
    mask = schema.decode_mask(record.masks[0], img.shape[1], img.shape[0])
    view = views.make_views(img.astype(np.float32) / 255, config.model.vision.image_size,
                            config.model.vision.max_tiles)
    expected = views.warp_to_view(mask.astype(np.float32), view.affine[0],
                                  config.model.vision.image_size, order=0)
    np.testing.assert_array_equal(example["seg_masks"][0], expected)
    np.testing.assert_allclose(example["view_affine"], view.affine)
    seen += 1
  assert seen


def test_answer_boxes_become_box_tokens_with_global_view_targets(config, tokenizer):
  """Box head on: each answer box is one [BOX] token and a target in the global view's [0, 1]
  frame (the text's bin centres through the global view's affine); off: the digits stay text."""
  source = sources.data_source(config, "synthetic_optical", "train")
  ids = ml_collections.ConfigDict(tokenizer_lib.special_token_ids(tokenizer))
  with_head = examples.ExampleProcessor(config, tokenizer)
  text_only = config.copy_and_resolve_references()
  text_only.model.box.head = False
  without_head = examples.ExampleProcessor(text_only, tokenizer)
  size = config.model.vision.image_size
  seen = 0
  for i in range(len(source)):
    record = schema.from_features(source[i])
    if record.task != "box_grounding":
      continue
    example = with_head.process(source[i])
    height, width = example["image_size"]
    (box,) = template.parse_coordinates(record.turns[1], width, height).boxes
    answer = example["targets"][example["loss_mask"]].tolist()
    assert answer.count(ids.box) == 1 and example["box_valid"].tolist() == [True] + [False] * (
        config.model.box.max_boxes - 1)
    affine = example["view_affine"][0]
    corners = np.array([[box[0], box[1], 1], [box[2], box[3], 1]]) @ affine.T / size
    np.testing.assert_allclose(example["box_targets"][0], corners.reshape(-1), rtol=1e-6)
    assert example["box_targets"][0].max() <= 1 and example["box_targets"][1].sum() == 0
    plain = without_head.process(source[i])
    assert ids.box not in plain["input_ids"] and not plain["box_valid"].any()
    assert tokenizer.decode(plain["targets"][plain["loss_mask"]]) == (
        " " + record.turns[1] + tokenizer.eos_token)
    seen += 1
  assert seen
  valid = np.ones(1 + config.model.vision.max_tiles, bool)
  over = " ".join(["[1,2,3,4]"] * (config.model.box.max_boxes + 1))
  with pytest.raises(schema.BadRecordError, match="too_many.*model.box.max_boxes=10"):
    with_head.tokenize(["<image>\nq", over], "optical", valid, (100, 100))
  # A literal "[BOX]" in the data has no target box: it becomes a space, never the token.
  text, _, boxes = with_head.tokenize(["<image>\nq", "a [BOX] b"], "optical", valid, (100, 100))
  assert ids.box not in text["input_ids"] and boxes == []


def test_truncation_keeps_prompt_and_cuts_the_answer(config, tokenizer):
  short = config.copy_and_resolve_references()
  short.data.max_length = 120
  processor = examples.ExampleProcessor(short, tokenizer)
  valid = np.ones(1 + config.model.vision.max_tiles, bool)
  long_answer = " ".join(["ship"] * 200)
  text, _, _ = processor.tokenize(["<image>\nq", long_answer, "next?", "more"], "optical", valid,
                                  (100, 100))
  ids = ml_collections.ConfigDict(tokenizer_lib.special_token_ids(tokenizer))
  assert (text["input_ids"] != ids.pad).all()  # filled to the limit
  assert np.sum(text["input_ids"] == ids.image_patch) == 3 * 16  # image tokens whole
  assert text["loss_mask"].sum() > 0 and ids.eos not in text["input_ids"]
  with pytest.raises(schema.BadRecordError, match="too_long"):
    tiny = short.copy_and_resolve_references()
    tiny.data.max_length = 40
    examples.ExampleProcessor(tiny, tokenizer).tokenize(["<image>\nq", "a"], "optical", valid,
                                                        (100, 100))


def test_mixing_proportions_within_2_percent(config):
  mixed = config.copy_and_resolve_references()
  for name, w in zip(sorted(mixed.data.sources), (0.5, 0.3, 0.2)):
    mixed.data.sources[name].weight = w
  sizes = {name: 90 for name in mixed.data.sources}
  it = iter(pipeline.mixed_indices(mixed, sizes, 0, 1))
  counts = collections.Counter(next(it)[0] for _ in range(10_000))
  for name in mixed.data.sources:
    assert abs(counts[name] / 10_000 - mixed.data.sources[name].weight) < 0.02, counts
  # The real pipeline reads what the mixture names.
  records = iter(pipeline.mixed_records(mixed, "train"))
  for _ in range(20):
    features = next(records)
    assert features["source"].decode() in ("synthetic_rs_optical", "synthetic_rs_sar",
                                           "synthetic_rs_infrared")


def test_task_mixing_weights_tasks_and_every_batch_carries_each(config, tokenizer, tmp_path):
  """data.mix_tasks: the mixture is over (source, task); equal task weights put every task in
  each batch of len(TASKS) examples whatever the stored task shares, a task's weight sets its
  share, a zero weight leaves it out, and the position resumes exactly through Orbax."""
  mixed = config.copy_and_resolve_references()
  mixed.data.mix_tasks = True
  for task in schema.TASKS:
    mixed.data.task_weights[task] = 1.0
  mixed.train.batch_size = len(schema.TASKS)
  it = pipeline.make_train_iterator(mixed, tokenizer)
  for _ in range(6):
    assert sorted(next(it)["task_id"].tolist()) == list(range(len(schema.TASKS)))
  _assert_resumes_through_orbax(it, mixed, tokenizer, tmp_path)

  mixed.data.task_weights.box_grounding = 3.0
  mixed.data.task_weights.vqa = 0.0
  sizes = {name: config.data.synthetic.num_train for name in mixed.data.sources}
  indices = iter(pipeline.mixed_indices(mixed, sizes, 0, 1))
  opened = {name: sources.data_source(mixed, name, "train") for name in mixed.data.sources}
  counts = collections.Counter(schema.feature_text(opened[name][index]["task"])
                               for name, index in (next(indices) for _ in range(2000)))
  assert counts["vqa"] == 0
  assert abs(counts["box_grounding"] / 2000 - 3 / 9) < 0.02, counts
  assert abs(counts["scene_classification"] / 2000 - 1 / 9) < 0.02, counts
  mixed.data.task_weights.land_cover = 1.0
  with pytest.raises(ValueError, match="data.task_weights.*land_cover"):
    pipeline.mixed_indices(mixed, sizes, 0, 1)


def test_mix_window_mixes_sensors_keeps_task_shares_and_resumes_mid_window(config, tokenizer,
                                                                          tmp_path):
  """data.mix_window: grain's interleave by (source, task) fills a batch from one sensor; a
  shuffled window gives batches several sensors, keeps each task's share of the window, and a
  checkpoint in the middle of a window resumes exactly."""
  mixed = config.copy_and_resolve_references()
  mixed.data.mix_tasks = True
  for task in schema.TASKS:
    mixed.data.task_weights[task] = 1.0
  mixed.train.batch_size = len(schema.TASKS)

  def sensors_per_batch(window: int, batches: int) -> list[int]:
    mixed.data.mix_window = window
    it = pipeline.make_train_iterator(mixed, tokenizer)
    return [len(set(next(it)["modality_id"].tolist())) for _ in range(batches)]

  assert set(sensors_per_batch(0, 6)) == {1}
  mixed.data.mix_window = -8
  with pytest.raises(ValueError, match=r"data.mix_window: .* got -8"):
    pipeline.make_train_iterator(mixed, tokenizer)
  window = 256
  mixed.data.mix_window = window
  it = pipeline.make_train_iterator(mixed, tokenizer)
  batches = [next(it) for _ in range(window // len(schema.TASKS))]
  tasks = collections.Counter(t for b in batches for t in b["task_id"].tolist())
  share = window / len(schema.TASKS)
  assert all(abs(tasks[t] - share) <= 1 for t in range(len(schema.TASKS))), tasks
  assert sum(len(set(b["modality_id"].tolist())) > 1 for b in batches) >= 0.9 * len(batches)
  for _ in range(3):  # into the next window
    next(it)
  _assert_resumes_through_orbax(it, mixed, tokenizer, tmp_path)


def test_eval_examples_per_task_caps_each_task(config, tokenizer):
  capped = config.copy_and_resolve_references()
  capped.train.eval_examples_per_task = 2
  tasks = [r.task for b in pipeline.make_eval_iterator(capped, tokenizer) for r in b.records
           if r is not None]
  counts = collections.Counter(tasks)
  everything = collections.Counter(
      r.task for b in pipeline.make_eval_iterator(config, tokenizer) for r in b.records
      if r is not None)
  assert counts == {t: min(n, 2) for t, n in everything.items()}, (counts, everything)


def _assert_continues_with(iterator, expected_batches):
  for want in expected_batches:
    got = next(iterator)
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _assert_resumes_through_orbax(it, config, tokenizer, tmp_path):
  """`it`'s position saved with Orbax and restored into a fresh iterator gives its next batches."""
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data_iter",)) as mngr:
    mngr.save(1, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = [next(it) for _ in range(3)]
    fresh = pipeline.make_train_iterator(config, tokenizer)
    mngr.restore(1, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_continues_with(fresh, expected)


def test_resume_from_orbax_gives_identical_batches(config, tokenizer, tmp_path):
  it = pipeline.make_train_iterator(config, tokenizer)
  for _ in range(2):
    next(it)
  _assert_resumes_through_orbax(it, config, tokenizer, tmp_path)


def test_processes_get_disjoint_shards(config, tokenizer):
  ids = []
  for p in range(2):
    seen = []
    for eval_batch in pipeline.make_eval_iterator(config, tokenizer, None, p, 2):
      seen += [r.id for r, v in zip(eval_batch.records, eval_batch.valid) if v]
      assert not eval_batch.batch["attention_mask"][~eval_batch.valid].any()
    ids.append(set(seen))
  assert ids[0] and ids[1] and not ids[0] & ids[1]
  assert len(ids[0] | ids[1]) == 3 * config.data.synthetic.num_eval
  # Train mixtures of the two processes never share a record either.
  train = [set() for _ in range(2)]
  for p in range(2):
    records = iter(pipeline.mixed_records(config, "train", p, 2))
    for _ in range(60):
      train[p].add(next(records)["id"])
  assert not train[0] & train[1]


def _bad_variants(good: schema.Record) -> dict[str, schema.Record]:
  import dataclasses
  r = dataclasses.replace
  small = schema.encode_mask(np.ones((3, 3), bool))
  empty = schema.encode_mask(np.zeros(Image.open(io.BytesIO(good.image)).size[::-1], bool))
  return {
      "corrupt_image": r(good, image=b"\x89PNG not really"),
      "unknown_modality": r(good, modality="lidar"),
      "unknown_task": r(good, task="dance"),
      "prompt_out_of_bounds": r(good, prompts=(schema.point_prompt(1e4, 1.0),),
                                turns=("<image>\nWhat is <vp1>?", "ship")),
      "mask_size_mismatch": r(good, turns=("<image>\nSegment it.", "[SEG]"), masks=(small,)),
      "seg_mask_count_mismatch": r(good, turns=("<image>\nSegment it.", "[SEG] [SEG]"),
                                   masks=(small,)),
      "no_answer": r(good, turns=("<image>\nWhat?",)),
      "bad_placeholder": r(good, turns=("<image>\nWhat is <vp3>?", "ship")),
      "bad_answer_box": r(good, turns=("<image>\nWhere is the ship?", "[10,20,30]")),
      "empty_mask": r(good, turns=("<image>\nSegment it.", "[SEG]"), masks=(empty,)),
  }


def test_bad_records_are_counted_skipped_and_abort_above_the_fraction(config, tokenizer):
  good = synthetic.make_record("optical", "train", 0, config.data.synthetic)
  bad = _bad_variants(good)
  # Bad records interleaved with the first 25 good ones; counts ride on delivered batches.
  records = [good] * 25 + list(bad.values())
  order = np.random.default_rng(0).permutation(len(records))
  features = [schema.to_features(records[i]) for i in order] + [schema.to_features(good)] * 5
  ds = grain.MapDataset.source(features).to_iter_dataset()
  cfg = config.copy_and_resolve_references()
  cfg.data.max_bad_fraction = 0.5
  it = pipeline.make_batches(ds, cfg, tokenizer, 5).__iter__()
  batches = list(it)
  assert len(batches) == 6 and it.good_records == 30
  assert it.bad_records == {reason: 1 for reason in bad}
  assert it.get_state()["bad_records"] == [int(r in bad) for r in schema.BAD_REASONS]
  cfg.data.max_bad_fraction = 0.1
  cfg.data.bad_check_min_records = 20
  strict = pipeline.make_batches(ds, cfg, tokenizer, 5).__iter__()
  with pytest.raises(bad_records.BadRecordFractionError, match="data.max_bad_fraction"):
    list(strict)


def _with_counts(state, make):
  """`state` with every per-reason counts vector (the accounting's totals "bad_records", the
  skip step's "pending" counts) replaced by make(key, counts)."""
  if isinstance(state, dict):
    return {k: make(k, v) if k in ("bad_records", "pending") else _with_counts(v, make)
            for k, v in state.items()}
  if isinstance(state, (list, tuple)):
    return type(state)(_with_counts(v, make) for v in state)
  return state


def test_a_state_saved_before_the_newest_bad_record_reason_restores(config, tokenizer):
  """Checkpoints written before `empty_mask` (the 14th reason) hold 13 counts per vector:
  they restore with zeros for the new reason and the stream continues exactly."""
  it = pipeline.make_train_iterator(config, tokenizer)
  next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  n = len(schema.BAD_REASONS) - 1
  old = _with_counts(state, lambda key, counts: [3 if key == "bad_records" else 1] + [0] * (n - 1))
  resumed = pipeline.make_train_iterator(config, tokenizer)
  resumed.set_state(old)
  _assert_continues_with(resumed, expected)
  # The 3 already counted and the 1 pending (it rides on the next good example).
  assert resumed.bad_records == {schema.BAD_REASONS[0]: 4}
  assert resumed.get_state()["bad_records"] == [4] + [0] * n
  newer = _with_counts(state, lambda key, counts: counts + [0])
  with pytest.raises(ValueError, match="saved state has 15 reasons.*newer version"):
    pipeline.make_train_iterator(config, tokenizer).set_state(newer)


def test_prepare_takes_a_config_completed_from_its_tokenizer(config, tokenizer):
  with pytest.raises(ValueError, match=r"model.token_ids.bos: None, but the tokenizer's is 1; "
                     r"complete the config with earthgptx_jax.tokenizer.complete_config"):
    pipeline.prepare(config, tokenizer)
  small = tokenizer_lib.complete_config(config, tokenizer)
  small.model.llm.vocab_size = len(tokenizer) - 1
  with pytest.raises(ValueError, match=f"model.llm.vocab_size: {len(tokenizer) - 1} is smaller"):
    pipeline.prepare(small, tokenizer)


def test_alignment_stage_then_the_mixture_and_exact_resume_across_the_switch(config, tokenizer):
  staged = config.copy_and_resolve_references()
  staged.train.alignment_steps = 3
  staged.data.alignment_tasks = ("scene_classification",)
  it = pipeline.make_train_iterator(staged, tokenizer)
  done = [next(it) for _ in range(2)]
  state = it.get_state()
  rest = [next(it) for _ in range(4)]
  scene = schema.TASKS.index("scene_classification")
  assert all((b["task_id"] == scene).all() for b in done + rest[:1])
  assert any((b["task_id"] != scene).any() for b in rest[1:])
  assert it.good_records == 6 * staged.train.batch_size
  resumed = pipeline.make_train_iterator(staged, tokenizer)
  resumed.set_state(state)
  _assert_continues_with(resumed, rest)
  staged.data.alignment_tasks = ("scene_classification", "land_cover")
  with pytest.raises(ValueError, match="data.alignment_tasks.*land_cover"):
    pipeline.make_train_iterator(staged, tokenizer)


@pytest.mark.slow
def test_worker_processes_resume_exactly(config, tokenizer):
  """With mp_prefetch each worker batches its own slice of the mixture (so batches differ
  from the in-process order); the iterator state still restores the exact stream."""
  from absl import flags
  flags.FLAGS.mark_as_parsed()  # grain reads its absl flags in the workers
  multi = config.copy_and_resolve_references()
  multi.data.num_workers = 2
  multi.data.mix_window = 64  # batches of several sensors (the interleave gives one a batch)
  it = pipeline.make_train_iterator(multi, tokenizer)
  got = [next(it) for _ in range(2)]
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  it.close()
  assert {int(m) for b in got + want for m in b["modality_id"]} == {0, 1, 2}
  resumed = pipeline.make_train_iterator(multi, tokenizer)
  resumed.set_state(state)
  _assert_continues_with(resumed, want)
  resumed.close()


def test_the_project_tokenizer_completes_the_config_that_prepare_takes(config):
  project_tokenizer = tokenizer_training.ensure_tokenizer(config)
  data = pipeline.prepare(tokenizer_lib.complete_config(config, project_tokenizer),
                          project_tokenizer)
  ids = data.config.model.token_ids
  tok = data.tokenizer
  assert ids.image_patch == tok.convert_tokens_to_ids(template.IMAGE_PATCH)
  assert ids.seg == tok.convert_tokens_to_ids(template.SEG)
  assert data.config.model.llm.vocab_size >= len(tok)
  assert data.config is not config  # the input config is left as it was
  assert config.model.llm.vocab_size == fusion.get_config("tiny").model.llm.vocab_size
  batch = next(data.train_iterator(0, 1))
  batch_lib.validate_batch(batch, data.config, config.train.batch_size)
  answer = batch["targets"][0][batch["loss_mask"][0]]
  assert answer[-1] == ids.eos


def test_concurrent_ensure_synthetic_builds_once(tmp_path):
  """All JAX processes call prepare(): concurrent builders must not collide."""
  import concurrent.futures
  cfg = fusion.get_config("tiny")
  cfg.data.synthetic.num_train = 6
  cfg.data.synthetic.num_eval = 3
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    paths = list(pool.map(lambda _: builders.ensure_synthetic(str(tmp_path), cfg), range(2)))
  assert paths[0] == paths[1]
  source = builders.data_source("synthetic_rs/sar", "validation", paths[0],
                                synthetic_config=cfg.data.synthetic)
  assert len(source) == 3


def test_an_edited_generator_gets_its_own_synthetic_folder(tmp_path, monkeypatch):
  """Cached data is keyed by the generator's code as well as its sizes: after an edit to
  synthetic_rs the job generates afresh instead of training on the old records."""
  cfg = fusion.get_config("tiny")
  cfg.data.synthetic.num_train = 6
  cfg.data.synthetic.num_eval = 3
  before = builders.ensure_synthetic(str(tmp_path), cfg)
  assert builders.ensure_synthetic(str(tmp_path), cfg) == before  # unchanged code: reused
  edited = tmp_path / "synthetic.py"
  edited.write_bytes(pathlib.Path(synthetic.__file__).read_bytes() + b"\n# an edit\n")
  stand_in = type(synthetic)("synthetic")
  stand_in.__file__ = str(edited)
  monkeypatch.setattr(builders, "SYNTHETIC_CODE", (stand_in, schema, template))
  after = builders.ensure_synthetic(str(tmp_path), cfg)
  assert after != before
  cfg.data.data_dir = str(tmp_path)
  assert sources.source_data_dir(cfg, "synthetic_rs/sar") == after  # where the loader reads
