"""Inference on a workdir: Python API answers with prompts; the CLI fails cleanly on bad input.

The workdir holds random tiny weights written as train.py writes them (config.json,
tokenizer/, an Orbax checkpoint), so no training is compiled here.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from earthgptx_jax import generate, overlay, template
from earthgptx_jax import predictor as predictor_lib
from model_fixtures import random_workdir, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIRST_IMAGE = "SIRST/images/Misc_10.png"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  texts = ["what is in the region? a ship near the plane", "segment the storage tank",
           "[12,40,300,512] the building is left of the vehicle"] * 20
  return random_workdir(tmp_path_factory.mktemp("infer"), texts)[0]


@pytest.fixture(scope="module")
def predictor(workdir):
  return predictor_lib.Predictor.from_workdir(workdir)


def test_predictor_answers_about_a_real_image_with_prompts(predictor, shared_data):
  image = (shared_data / SIRST_IMAGE).read_bytes()
  prompts = [predictor_lib.parse_prompt_flag("box", "10,10,60,50"),
             predictor_lib.parse_prompt_flag("point", "30,40")]
  first = predictor(image, "infrared", "What is inside <vp1> and near <vp2>?", prompts,
                    max_new_tokens=8)
  again = predictor(image, "infrared", "What is inside <vp1> and near <vp2>?", prompts,
                    max_new_tokens=8)
  assert isinstance(first.answer, str) and first.answer == again.answer  # greedy: deterministic
  for mask in first.masks:  # one per generated [SEG], in the original image's frame
    assert mask.dtype == bool and mask.shape == preprocess_shape(image)
  sampled = predictor(image, "infrared", "Describe the image.", [], max_new_tokens=8,
                      temperature=1.0, top_p=0.9, seed=3)
  assert isinstance(sampled.answer, str)


def test_stream_yields_the_answer_token_by_token_then_what_predict_returns(predictor,
                                                                           shared_data):
  image = (shared_data / SIRST_IMAGE).read_bytes()
  record = predictor_lib.request_record(
      image, "infrared", "What is inside <vp1>?", [predictor_lib.parse_prompt_flag(
          "box", "10,10,60,50")])
  *texts, final = predictor.stream(record, max_new_tokens=8)
  expected = predictor.predict([record], max_new_tokens=8)[0]
  assert isinstance(final, generate.Prediction) and final.answer == expected.answer
  assert all(isinstance(t, str) for t in texts)
  # One update per generated text token (EOS, padding and [SEG] are not text).
  ids = predictor.config.model.token_ids
  out = predictor.generator(predictor.params, predictor.prepare([record])[0], max_new_tokens=8)
  shown = [t for t in out.tokens[0, :out.lengths[0]] if t not in (ids.eos, ids.pad, ids.seg)]
  assert len(texts) == len(shown) >= 2
  if template.BOX not in predictor.tokenizer.decode(shown):
    assert " ".join(texts[-1].split()) == final.answer.replace(template.SEG, "").strip()


def test_history_becomes_earlier_turns_and_an_overlong_one_loses_its_oldest(predictor,
                                                                            shared_data):
  image = (shared_data / SIRST_IMAGE).read_bytes()
  history = [("Question 0 about <vp1>?", "answer 0 [SEG] [1,2,3]")]
  prompts = [predictor_lib.parse_prompt_flag("point", "30,40")]
  record = predictor_lib.request_record(image, "infrared", "And now?", prompts,
                                        history=history[:1])
  # The answer's [SEG] has no mask to give; a malformed coordinate stays text.
  assert record.turns == (f"{template.IMAGE_PLACEHOLDER}\nQuestion 0 about <vp1>?",
                          "answer 0 (1,2,3)", "And now?", "-")
  # The tiny preset's 256 tokens, mostly image tokens, hold one short earlier turn.
  long = predictor_lib.request_record(image, "infrared", "And now?", prompts,
                                      history=[(f"Q{i} <vp1>?", f"a{i}") for i in range(40)])
  _, (kept,) = predictor.prepare([long])
  assert kept.turns[-2:] == ("And now?", "-") and 2 < len(kept.turns) < len(long.turns)
  assert kept.turns[0].startswith(template.IMAGE_PLACEHOLDER)
  earlier = len(kept.turns) // 2 - 1  # the most recent earlier turns are the ones kept
  assert kept.turns[1:-1:2] == long.turns[1:-1:2][-earlier:]


def preprocess_shape(image_bytes):
  from data_pipelines import preprocess
  return preprocess.decode_image(image_bytes).shape[:2]


def test_bad_requests_raise_one_clear_error(predictor, shared_data):
  image = (shared_data / SIRST_IMAGE).read_bytes()
  h, w = preprocess_shape(image)
  with pytest.raises(predictor_lib.InferenceError, match="outside"):
    predictor(image, "infrared", "What is in <vp1>?",
              [predictor_lib.parse_prompt_flag("box", f"{w + 10},{h + 10},{w + 40},{h + 40}")])
  with pytest.raises(predictor_lib.InferenceError, match="corrupt_image"):
    predictor(b"not an image", "infrared", "Describe.")
  with pytest.raises(predictor_lib.InferenceError, match="unknown_modality"):
    predictor(image, "hyperspectral", "Describe.")
  with pytest.raises(predictor_lib.InferenceError, match="--box"):
    predictor_lib.parse_prompt_flag("box", "1,2,3")


def _cli(*args):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "earthgptx_jax.infer", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)


def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, workdir, shared_data):
  image = str(shared_data / SIRST_IMAGE)
  out = tmp_path / "overlay.png"
  cases = [
      ([f"--workdir={tmp_path / 'nothing'}", f"--image={image}", "--text=hi"], "config.json"),
      ([f"--workdir={workdir}", f"--image={tmp_path / 'missing.png'}", "--text=hi"], "--image"),
      ([f"--workdir={workdir}", f"--image={image}", "--text=hi", "--box=1,2"], "--box"),
      ([f"--workdir={workdir}", f"--image={image}", "--text=hi",
        f"--out={tmp_path / 'no_such_dir' / 'o.png'}"], "--out"),
  ]
  for args, needle in cases:
    if not any(a.startswith("--out") for a in args):
      args = [*args, f"--out={out}"]
    result = _cli(*args)
    assert result.returncode != 0, args
    error_lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(error_lines) == 1 and needle in error_lines[0], result.stderr[-2000:]
  assert not out.exists() and not list(tmp_path.glob(".overlay*"))


@pytest.mark.slow
def test_cli_writes_answer_and_overlay(tmp_path, workdir, shared_data):
  out = tmp_path / "overlay.png"
  result = _cli(f"--workdir={workdir}", f"--image={shared_data / SIRST_IMAGE}",
                "--modality=infrared", "--text=What is inside <vp1>?", "--box=10,10,60,50",
                f"--out={out}", "--max_new_tokens=8")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "overlay written" in result.stdout
  from PIL import Image
  with Image.open(out) as img:
    assert img.size[::-1] == preprocess_shape((shared_data / SIRST_IMAGE).read_bytes())


def test_box_tokens_are_written_as_the_heads_boxes_in_the_original_frame(predictor):
  """[BOX] -> the head's box (global view, [0, 1]) mapped back through the global view's affine
  and written in template.py's format; [SEG] leaves the text; the rest decodes as is."""
  from earthgptx_jax import geometry
  config, tok = predictor.config, predictor.tokenizer
  ids, size = config.model.token_ids, config.model.vision.image_size
  height, width = 90, 150  # landscape: the global view pads the bottom
  affine = geometry.view_affines(height, width, size, 0)[0][0]
  box = (30.0, 12.0, 96.0, 60.0)
  in_view = np.array([[box[0], box[1], 1], [box[2], box[3], 1]]) @ affine.T / size
  generated = (tok.encode("the ship is at", add_special_tokens=False) + [ids.box, ids.seg]
               + tok.encode(" left", add_special_tokens=False) + [ids.eos])
  answer = generate.answer_text(generated, tok, config, in_view.reshape(1, 4), affine,
                                (height, width))
  assert answer.startswith("the ship is at [") and answer.endswith("] left")
  (parsed,) = template.parse_coordinates(answer, width, height).boxes
  np.testing.assert_allclose(parsed, box, atol=width / template.COORD_BINS)
  # More [BOX] tokens than boxes (beyond model.box.max_boxes): the extra ones leave the text.
  assert generate.answer_text([ids.box, ids.box], tok, config, in_view.reshape(1, 4), affine,
                              (height, width)).count("[") == 1


def _cli_in(cwd, *args):
  """The CLI run as a user would: from `cwd`, with the paths given relative to it."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
  return subprocess.run([sys.executable, "-m", "earthgptx_jax.infer", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=900)


def test_cli_request_errors_come_before_loading_the_model(tmp_path):
  """A request that is wrong whatever the model (image, prompt geometry, <vpK>) is refused
  before the workdir is read: here the workdir is empty, so reaching it would say
  'no config.json' instead of naming the request's field."""
  from PIL import Image
  Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / "scene.png")  # 40 wide, 30 high
  (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
  (tmp_path / "empty_run").mkdir()
  (tmp_path / "requests.jsonl").write_text(
      '{"image": "scene.png", "text": "Describe."}\n'
      '{"image": "scene.png", "text": "What is in <vp1>?", "boxes": ["5,5,50,20"]}\n')
  common = ["--workdir=empty_run", "--modality=infrared"]
  cases = [
      (["--image=broken.png", "--text=hi"], ["--image", "broken.png", "corrupt_image"]),
      (["--image=missing.png", "--text=hi"], ["--image", "missing.png"]),
      (["--image=scene.png", "--text=What is in <vp1>?", "--box=30,10,60,20"],
       ["--box", "30,10,60,20", "outside the 40x30 image"]),
      (["--image=scene.png", "--text=What is in <vp1>?", "--box=20,10,10,20"],
       ["--box", "20,10,10,20", "x2<x1"]),
      (["--image=scene.png", "--text=Compare <vp1> and <vp2>.", "--point=5,5"],
       ["--text", "<vp2>", "1 visual prompt"]),
      (["--requests=requests.jsonl", "--results=out.jsonl"],
       ["--requests line 2", "boxes", "5,5,50,20", "outside"]),
  ]
  for args, needles in cases:
    result = _cli_in(tmp_path, *common, *args)
    assert result.returncode == 2, (args, result.stderr[-2000:])
    error_lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(error_lines) == 1, (args, result.stderr[-2000:])
    for needle in needles:
      assert needle in error_lines[0], (args, error_lines[0])
    assert "config.json" not in result.stderr, args  # the workdir was never opened
  assert not (tmp_path / "out.jsonl").exists()


def _white_png(height, width):
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.full((height, width, 3), 255, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def _run_length(line: np.ndarray, start: int) -> int:
  """Length of the run of True around `start` in a 1-D bool array."""
  if not line[start]:
    return 0
  lo = hi = start
  while lo > 0 and line[lo - 1]:
    lo -= 1
  while hi < len(line) - 1 and line[hi + 1]:
    hi += 1
  return hi - lo + 1


def test_overlay_strokes_and_labels_scale_with_the_image_and_show_on_white():
  """On a white (hot infrared-like) image the user's prompts and the predicted boxes are seen,
  and on a 4592x3072 scene the strokes and labels are as large, relative to the image, as on a
  small one (they were 2 px and a ~10 px label at any size)."""
  cfg = tiny_config().model.vision.preprocess
  measured = {}
  for height, width in ((200, 300), (3072, 4592)):
    fx, fy = width / 300, height / 200
    box = (60 * fx, 50 * fy, 180 * fx, 150 * fy)
    prompts = [predictor_lib.parse_prompt_flag("box", ",".join(str(v) for v in box)),
               predictor_lib.parse_prompt_flag("point", f"{250 * fx},{30 * fy}")]
    predicted = (200 * fx, 110 * fy, 280 * fx, 190 * fy)
    prediction = generate.Prediction("a target", [predicted], [], [])
    img = np.asarray(overlay.render_overlay(_white_png(height, width), "optical", prompts,
                                            prediction, cfg))
    assert img.shape == (height, width, 3)
    drawn = (img != 255).any(-1)
    # The prompt box's left edge: a vertical stroke crossed by the row through its middle.
    mid_y, x1 = int((box[1] + box[3]) / 2), int(box[0])
    prompt_stroke = _run_length(drawn[mid_y], x1)
    # The predicted box's left edge likewise.
    pred_stroke = _run_length(drawn[int((predicted[1] + predicted[3]) / 2)], int(predicted[0]))
    assert prompt_stroke > 0 and pred_stroke > 0, (height, width)  # visible on white
    # The point prompt's marker is visible on white too.
    px, py = int(250 * fx), int(30 * fy)
    r = int(0.05 * min(height, width))
    assert drawn[py - r:py + r, px - r:px + r].any(), (height, width)
    # The prompt's label (vp1) sits just above the box's top-left corner: its glyphs' height.
    above = drawn[max(0, int(box[1] - max(30, 0.06 * min(height, width)))):
                  int(box[1]) - prompt_stroke, int(box[0]):int(box[2])]
    rows = np.nonzero(above.any(1))[0]
    assert len(rows), (height, width)
    measured[height] = (prompt_stroke, pred_stroke, rows.max() - rows.min() + 1)
  small, large = measured[200], measured[3072]
  assert all(3 <= v <= 0.1 * 200 for v in small), measured  # small images keep a minimum
  # 4592x3072: strokes >= 0.4 % and labels >= 1.5 % of the short side (were 2 px and ~10 px).
  assert min(large[:2]) >= 0.004 * 3072 and large[2] >= 0.015 * 3072, measured
