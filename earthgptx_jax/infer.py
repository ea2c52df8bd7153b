r"""Ask a trained EarthGPT-X about an image: text answer, parsed boxes, [SEG] masks, overlay.

  python -m earthgptx_jax.infer --workdir=DIR --image=scene.png --modality=sar \
      --text="What is inside <vp1>?" --box=120,40,180,96 --out=answer.png

Batch mode over a JSONL of requests: `--requests=in.jsonl --results=out.jsonl`. The same as a
Python API: `predictor.Predictor.from_workdir(DIR)(image, modality, text, prompts)`.

The first call on a machine compiles the model (about a minute for the tiny preset on 2 cores);
later calls load its programs from the training run's XLA cache (train.compilation_cache_dir,
with the exported programs of programs.py beside it) in a few seconds. Nothing is written into
the workdir: a cache folder inside it is not used.
"""

from __future__ import annotations

from earthgptx_jax import host_memory

if __name__ == "__main__":  # before the imports below, which it would repeat: it restarts
  host_memory.reexec_with_huge_page_malloc()  # the process with huge-page malloc

import json
import os
import pathlib
import sys
import tempfile

from absl import app, flags

from earthgptx_jax import cli, overlay, paths, template
from earthgptx_jax.predictor import (InferenceError, Predictor, parse_prompt_flag,
                                     prediction_json, read_image, request_record,
                                     validate_request)

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json, tokenizer/, "
                               "checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest usable one).")
_IMAGE = flags.DEFINE_string("image", None, "Image file (PNG/JPEG/TIFF, 8/16-bit, 1..N bands).")
_MODALITY = flags.DEFINE_enum("modality", "optical", list(template.MODALITIES), "Sensor.")
_TEXT = flags.DEFINE_string("text", None, "Instruction; <vp1>, <vp2>... name the prompts.")
_POINTS = flags.DEFINE_multi_string("point", [], "x,y in original pixels (repeatable).")
_BOXES = flags.DEFINE_multi_string("box", [], "x1,y1,x2,y2 in original pixels (repeatable).")
_SCRIBBLES = flags.DEFINE_multi_string(
    "scribble", [], "A mask PNG, or a polyline 'x,y;x,y;...' ('...;closed' for a polygon).")
_OUT = flags.DEFINE_string("out", None, "Write an overlay PNG here.")
_REQUESTS = flags.DEFINE_string("requests", None, "Batch mode: JSONL of requests "
                                "{image, modality, text, points, boxes, scribbles}; relative "
                                "image paths are read from the current directory.")
_RESULTS = flags.DEFINE_string("results", None, "Batch mode: JSONL results written here.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Answer length limit.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sampling.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def _write_atomic(path: pathlib.Path, write) -> None:
  """Writes through a temp file in the target folder, then renames: never a half file."""
  folder = path.resolve().parent
  if not folder.is_dir():
    raise InferenceError(f"--out: folder {str(folder)!r} does not exist")
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _prompts_from(points, boxes, scribbles):
  # Prompts are numbered in this order: points, then boxes, then scribbles.
  return ([parse_prompt_flag("point", v) for v in points]
          + [parse_prompt_flag("box", v) for v in boxes]
          + [parse_prompt_flag("scribble", v) for v in scribbles])


def _answer_requests(kwargs) -> None:
  """Batch mode: every request of --requests checked, then answered in one batch."""
  if not _RESULTS.value:
    raise InferenceError("--results: required with --requests")
  lines = pathlib.Path(_REQUESTS.value).read_text().splitlines()
  requests = []
  for n, line in enumerate(l for l in lines if l.strip()):
    where = f"--requests line {n + 1}"
    try:
      r = json.loads(line)
      kinds = {k: list(r.get(k, [])) for k in ("points", "boxes", "scribbles")}
      record = request_record(read_image(r["image"]), r.get("modality", "optical"),
                              r["text"], _prompts_from(*kinds.values()))
    except (json.JSONDecodeError, KeyError) as e:
      raise InferenceError(f"{where}: {type(e).__name__}: {e}") from None
    except InferenceError as e:
      raise InferenceError(f"{where}: {e}") from None
    validate_request(record, image=f"{where}: image {r['image']!r}",
                     text=f"{where}: text {r['text']!r}",
                     modality=f"{where}: modality {record.modality!r}",
                     prompts=[f"{where}: {k}[{j}] {v!r}" for k, values in kinds.items()
                              for j, v in enumerate(values)])
    requests.append(record)
  predictions = Predictor.from_workdir(_WORKDIR.value, _STEP.value).predict(requests, **kwargs)
  _write_atomic(pathlib.Path(_RESULTS.value), lambda tmp: pathlib.Path(tmp).write_text(
      "".join(json.dumps(prediction_json(p)) + "\n" for p in predictions)))
  print(f"wrote {len(predictions)} results to {_RESULTS.value}")


def _answer_one(kwargs) -> None:
  """One request from --image / --text / prompt flags: printed, and drawn to --out."""
  if not _IMAGE.value or _TEXT.value is None:
    raise InferenceError("--image and --text: required (or --requests for batch mode)")
  image_bytes = read_image(_IMAGE.value)
  prompts = _prompts_from(_POINTS.value, _BOXES.value, _SCRIBBLES.value)
  if _OUT.value and not pathlib.Path(_OUT.value).resolve().parent.is_dir():
    raise InferenceError(f"--out: folder of {_OUT.value!r} does not exist")
  # Everything that needs no model is checked before the model is loaded.
  validate_request(
      request_record(image_bytes, _MODALITY.value, _TEXT.value, prompts),
      image=f"--image {_IMAGE.value!r}", text=f"--text {_TEXT.value!r}",
      modality=f"--modality {_MODALITY.value!r}",
      prompts=[f"--{k} {v!r}" for k, values in (("point", _POINTS.value), ("box", _BOXES.value),
                                                ("scribble", _SCRIBBLES.value)) for v in values])
  predictor = Predictor.from_workdir(_WORKDIR.value, _STEP.value)
  prediction = predictor(image_bytes, _MODALITY.value, _TEXT.value, prompts, **kwargs)
  print(prediction.answer)
  for b, box in enumerate(prediction.boxes):
    print(f"box{b + 1}: [{', '.join(f'{v:.1f}' for v in box)}]")
  if prediction.parse_error:
    print(f"(answer holds malformed coordinates: {prediction.parse_error})")
  for q, score in enumerate(prediction.mask_scores):
    print(f"mask{q + 1}: {int(prediction.masks[q].sum())} px, predicted IoU {score:.3f}")
  if _OUT.value:
    image = overlay.render_overlay(image_bytes, _MODALITY.value, prompts, prediction,
                                   predictor.config.model.vision.preprocess)
    _write_atomic(pathlib.Path(_OUT.value), lambda tmp: image.save(tmp, format="PNG"))
    print(f"overlay written to {_OUT.value}")


def main(argv):
  del argv
  cli.quiet_library_logs()
  kwargs = dict(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                top_p=_TOP_P.value, seed=_SEED.value)
  try:
    paths.resolve_flags("workdir", "image", "out", "requests", "results")
    cli.use_workdir_compilation_cache(_WORKDIR.value)
    if not _WORKDIR.value:
      raise InferenceError("--workdir: required")
    if _REQUESTS.value:
      _answer_requests(kwargs)
    else:
      _answer_one(kwargs)
  except (InferenceError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
