"""Hypothesis fuzz of stored records through the whole example path (decode, validate,
preprocess, views, prompt rasterisation, template, tokenisation): the only error it may raise
is the documented `schema.BadRecordError`, and what it returns follows the batch contract."""

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from configs import fusion
from data_pipelines import examples, schema
from earthgptx_jax import batch as batch_lib
from earthgptx_jax import template
from tests.data_fixtures import make_test_tokenizer

_WORDS = ["ship", "plane", "What is", "Segment the", "[1,2,3,4]", "\n", " ", "é", "<img>", "</s>",
          "<im_patch>", "<pad>"]


@pytest.fixture(scope="module")
def processor():
  config = fusion.get_config("tiny")
  texts = [template.SYSTEM_PROMPT, "ship plane storage tank What is Segment the"] * 5
  return examples.ExampleProcessor(config, make_test_tokenizer(texts, vocab_size=300)), config


def _png(array: np.ndarray, mode: str) -> bytes:
  buf = io.BytesIO()
  if mode == "I;16":
    Image.fromarray(array.astype(np.uint16) * 257).save(buf, format="PNG")
  else:
    Image.fromarray(array).convert(mode).save(buf, format="PNG")
  return buf.getvalue()


def _mask_png(rng, h, w):
  mask = rng.random((h, w)) > 0.5
  mask[rng.integers(h), rng.integers(w)] = True
  return _png(mask.astype(np.uint8) * 255, "L")


@st.composite
def _prompt(draw, rng, h, w):
  kind = draw(st.sampled_from(schema.PROMPT_KINDS))
  n = {"point": 1, "box": 2, "polygon": draw(st.integers(3, 5)),
       "scribble": draw(st.integers(2, 4)), "mask": 0}[kind]
  pts = rng.random((n, 2)) * [w, h]
  if kind == "box":
    pts = np.sort(pts, axis=0)
  return [kind, pts.astype(np.float32), _mask_png(rng, h, w) if kind == "mask" else b""]


def _words(draw, n_max):
  return " ".join(draw(st.lists(st.sampled_from(_WORDS), max_size=n_max)))


# Each turns a valid record into one that breaks one rule (or stresses a limit).
_MUTATIONS = ("junk_image", "truncated_image", "empty_image", "modality", "task", "nan_point",
              "outside_point", "point_count", "mask_size", "junk_mask", "extra_seg",
              "no_answer", "empty_answer", "missing_vp", "image_in_answer", "array_counts",
              "long_answer", "long_question", "many_turns", "too_many_prompts")


@st.composite
def records(draw, mutations=None):
  """A valid record, then `mutations` in order (default: 0-2 drawn from _MUTATIONS). A mutation
  that does not apply to the record as it stands (no prompts, no answer turn...) is skipped."""
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  h, w = draw(st.integers(1, 48)), draw(st.integers(1, 48))
  image = _png(rng.integers(0, 256, (h, w), np.uint8),
               draw(st.sampled_from(["L", "RGB", "RGBA", "P", "I;16"])))
  prompts = [draw(_prompt(rng, h, w)) for _ in range(draw(st.integers(0, 2)))]
  refs = " ".join(template.vp_placeholder(k + 1) for k in range(len(prompts)))
  num_seg = draw(st.integers(0, 2))
  turns = [f"<image>\n{_words(draw, 6)} {refs}",
           f"{_words(draw, 6)} {' '.join([template.SEG] * num_seg)} ok"]
  masks = [_mask_png(rng, h, w) for _ in range(num_seg)]
  counts = [len(p[1]) for p in prompts]
  modality = draw(st.sampled_from(schema.MODALITIES))
  task = draw(st.sampled_from(schema.TASKS))
  if mutations is None:
    mutations = draw(st.lists(st.sampled_from(_MUTATIONS), max_size=2))
  for m in mutations:
    if m == "junk_image":
      image = draw(st.binary(max_size=64))
    elif m == "truncated_image":
      image = image[:draw(st.integers(0, max(len(image) - 1, 0)))]
    elif m == "empty_image":
      image = b""
    elif m == "modality":
      modality = "lidar"
    elif m == "task":
      task = "dance"
    elif m in ("nan_point", "outside_point") and prompts and len(prompts[0][1]):
      prompts[0][1][0, 0] = np.nan if m == "nan_point" else w + 3.0
    elif m == "point_count" and prompts:
      prompts[0][1] = np.concatenate([prompts[0][1], [[0.0, 0.0]]]).astype(np.float32)
      counts[0] += 1
    elif m == "mask_size" and masks:
      masks[0] = _mask_png(rng, h + 1, w)
    elif m == "junk_mask" and (masks or prompts):
      if masks:
        masks[0] = b"not a png"
      else:
        prompts[0][2] = b"not a png"
    elif m == "extra_seg" and len(turns) > 1:
      turns[1] += f" {template.SEG}"
    elif m == "no_answer":
      turns = turns[:1]
    elif m == "empty_answer" and len(turns) > 1:
      turns[1] = " "
    elif m == "missing_vp":
      turns[0] += draw(st.sampled_from([" <vp9>", " <vp0>"]))
    elif m == "image_in_answer" and len(turns) > 1:
      turns[1] += " <image>"
    elif m == "array_counts" and counts:
      counts[0] += 1
    elif m == "long_answer" and len(turns) > 1:
      turns[1] = " ".join(["ship"] * 300) + " " + turns[1]
    elif m == "long_question":
      turns[0] += " ship" * 300
    elif m == "many_turns":
      turns += [_words(draw, 10), _words(draw, 10)] * draw(st.integers(1, 4))
    elif m == "too_many_prompts":
      prompts += [draw(_prompt(rng, h, w)) for _ in range(3)]
      counts += [len(p[1]) for p in prompts[-3:]]
  return {
      "id": b"fuzz",
      "image": image,
      "modality": modality.encode(),
      "source": b"fuzz",
      "task": task.encode(),
      "turns": [t.encode() for t in turns],
      "prompt_kind": [p[0].encode() for p in prompts],
      "prompt_num_points": np.asarray(counts, np.int32),
      "prompt_points": (np.concatenate([p[1] for p in prompts]).reshape(-1, 2) if prompts
                        else np.zeros((0, 2), np.float32)),
      "prompt_mask": [p[2] for p in prompts],
      "masks": masks,
  }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(features=records())
def test_only_documented_errors(processor, features):
  _check_only_documented_errors(*processor, features)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(features=records(mutations=("no_answer", "extra_seg")))
def test_extra_seg_after_no_answer_is_generated(processor, features):
  """The generator once crashed here itself (IndexError: no answer turn to add [SEG] to)."""
  assert len(features["turns"]) == 1
  _check_only_documented_errors(*processor, features)


@pytest.mark.parametrize("first", _MUTATIONS)
@settings(max_examples=2, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.large_base_example, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_mutation_pair_is_generated(processor, first, data):
  """Every ordered pair `records` can draw makes a record: the generator never fails itself."""
  for second in _MUTATIONS:
    features = data.draw(records(mutations=(first, second)), label=second)
    _check_only_documented_errors(*processor, features)


@pytest.mark.parametrize("image", [b"II*\x00", b"MM\x00*\x00\x00\x00\x08", b"II*\x00" + bytes(8)])
def test_truncated_tiff_is_a_bad_record(processor, image):
  """Found by the pair test: a TIFF header with nothing valid after it raised struct.error /
  IndexError out of tifffile instead of a bad record."""
  proc, _ = processor
  features = {"id": b"fuzz", "image": image, "modality": b"optical", "source": b"fuzz",
              "task": b"image_caption", "turns": [b"<image>\nDescribe.", b"ok"],
              "prompt_kind": [], "prompt_num_points": np.zeros((0,), np.int32),
              "prompt_points": np.zeros((0, 2), np.float32), "prompt_mask": [], "masks": []}
  with pytest.raises(schema.BadRecordError) as e:
    proc.process(features)
  assert e.value.reason == "corrupt_image"


def _check_only_documented_errors(proc, config, features):
  try:
    example = proc.process(features)
  except schema.BadRecordError as e:
    assert e.reason in schema.BAD_REASONS
    return
  batch = {k: np.asarray(v)[None] for k, v in example.items()}
  batch_lib.validate_batch(batch, config, 1)
  assert batch["loss_mask"].any()
  ids = proc.ids
  input_ids = example["input_ids"]
  # Only the template places image / prompt tokens, whatever the text says.
  assert np.sum(input_ids == ids.image_patch) == proc.num_views * proc.tokens_per_view
  np.testing.assert_array_equal(example["vp_token_index"] >= 0, input_ids == ids.vp_patch)
  assert example["seg_valid"].sum() == np.sum(example["targets"][example["loss_mask"]] == ids.seg)
