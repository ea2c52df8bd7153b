r"""Ask a trained EarthGPT-X about an image: text answer, parsed boxes, [SEG] masks, overlay.

  python -m earthgptx_jax.infer --workdir=DIR --image=scene.png --modality=sar \
      --text="What is inside <vp1>?" --box=120,40,180,96 --out=answer.png

The same as a Python API: `Predictor.from_workdir(DIR)(image, modality, text, prompts)`, and a
batch mode over a JSONL of requests (`--requests=in.jsonl --results=out.jsonl`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import linen as nn

from earthgptx_jax import paths, sharding, template
from earthgptx_jax.models import decoding, earthgptx, llama


@dataclasses.dataclass
class Prediction:
  answer: str
  boxes: list[tuple[float, float, float, float]]  # parsed from the answer, original pixels
  masks: list[np.ndarray]  # one bool [H, W] per generated [SEG], original frame
  mask_scores: list[float]  # the decoder's predicted IoU per mask
  parse_error: str | None = None  # the answer held malformed coordinates


class Generated(NamedTuple):
  """What `Generator` returns, as numpy."""
  tokens: np.ndarray  # [B, N] generated ids
  lengths: np.ndarray  # [B] tokens up to and including EOS
  mask_logits: np.ndarray  # [B, Q, S, S] one mask per generated [SEG], global-view frame
  iou: np.ndarray  # [B, Q] the decoder's predicted IoU
  seg_valid: np.ndarray  # [B, Q]
  boxes: np.ndarray  # [B, Qb, 4] one box per generated [BOX], global view in [0, 1]
  box_valid: np.ndarray  # [B, Qb]


class Generator:
  """Jitted multimodal generation: visual prefill -> KV-cached LLM decoding -> [SEG] masks and
  [BOX] boxes."""

  def __init__(self, config: ml_collections.ConfigDict, params: Any, mesh=None):
    self.config = config
    self.params = params
    self.mesh = mesh
    self.model = earthgptx.EarthGPTX(config.model)
    self.llm = llama.Llama(config.model.llm)
    self._prefill = jax.jit(self._prefill_impl)
    self._heads = jax.jit(self._heads_impl)

  def _prefill_impl(self, params, batch):
    visual = self.model.apply({"params": params}, batch,
                              method=earthgptx.EarthGPTX.encode_visual)
    embeds = self.model.apply({"params": params}, batch, visual.image_llm, visual.prompt_llm,
                              method=earthgptx.EarthGPTX.embed_inputs)
    return embeds, visual.dense, visual.box_features

  def _heads_impl(self, params, hidden, tokens, pixel_values, dense, box_features):
    masks = self.model.apply({"params": params}, hidden, tokens, pixel_values, dense,
                             method=earthgptx.EarthGPTX.decode_masks)
    boxes, box_valid, _ = self.model.apply({"params": params}, hidden, tokens, box_features,
                                           method=earthgptx.EarthGPTX.decode_boxes)
    return (*masks, boxes, box_valid)

  def __call__(self, batch: dict[str, np.ndarray], *, max_new_tokens: int,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> Generated:
    """batch: prompt-only model batch (batch.py) -> Generated."""
    ids = self.config.model.token_ids
    with contextlib.ExitStack() as stack:
      if self.mesh is not None:  # params live on the training mesh: replicate the batch there
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES))
        batch = jax.device_put(dict(batch), sharding.replicated(self.mesh))
      else:
        batch = jax.tree.map(jnp.asarray, batch)
      embeds, dense, box_features = self._prefill(self.params, batch)
      out = decoding.generate(self.llm, self.params["llm"], inputs_embeds=embeds,
                              attention_mask=batch["attention_mask"],
                              max_new_tokens=max_new_tokens, eos_id=int(ids.eos),
                              pad_id=int(ids.pad), rng=jax.random.key(seed),
                              temperature=temperature, top_p=top_p, return_hidden_states=True)
      heads = self._heads(self.params, out.hidden_states, out.tokens, batch["pixel_values"],
                          dense, box_features)
    return Generated(np.asarray(out.tokens), np.asarray(out.lengths),
                     *(np.asarray(x) for x in heads))


def answer_text(ids: Sequence[int], tokenizer, config: ml_collections.ConfigDict,
                boxes: np.ndarray, global_affine: np.ndarray, image_hw: tuple[int, int]) -> str:
  """Generated ids -> the answer as text: [SEG] tokens removed (their masks are returned
  apart), each [BOX] written as the box head's box in the `[x1,y1,x2,y2]` format (template.py),
  whitespace collapsed.

  boxes: [Qb, 4] the head's boxes in the global view in [0, 1], in [BOX] order;
  global_affine: [2, 3] the global view's affine (batch.py `view_affine[:, 0]`);
  image_hw: the original (height, width).
  """
  from earthgptx_jax import geometry
  token_ids = config.model.token_ids
  seg_id, box_id = int(token_ids.seg), token_ids.get("box", None)
  box_id = -1 if box_id is None else int(box_id)  # configs from before the box head
  ids = [t for t in ids if t != seg_id]
  size = float(config.model.vision.image_size)
  height, width = image_hw
  pieces, start, q = [], 0, 0
  for i, t in enumerate(ids):
    if t != box_id:
      continue
    pieces.append(tokenizer.decode(ids[start:i], skip_special_tokens=True))
    if q < len(boxes):
      box = geometry.boxes_to_original(np.asarray(boxes[q]) * size, global_affine)
      box = np.clip(box, 0, [width, height, width, height])
      pieces.append(f" {template.format_box(box, width, height)} ")
    q += 1
    start = i + 1
  pieces.append(tokenizer.decode(ids[start:], skip_special_tokens=True))
  return " ".join("".join(pieces).split())


class InferenceError(ValueError):
  """A request the model cannot answer (bad image, prompt, modality, path): one clear line."""


def _request_record(image_bytes: bytes, modality: str, text: str, prompts: Sequence[Any]):
  """A schema.Record for one request. The answer turn is a stand-in that is cut off before
  generation (evaluate.truncate_to_question), so requests go through exactly the training
  example path: decoding, per-modality preprocessing, views, rasterisation, template."""
  from data_pipelines import schema
  if template.IMAGE_PLACEHOLDER not in text:
    text = f"{template.IMAGE_PLACEHOLDER}\n{text}"
  return schema.Record(id="request", image=image_bytes, modality=modality, source="request",
                       task="vqa", turns=(text, "-"), prompts=tuple(prompts))


# BadRecordError reasons caused by one prompt, traced to it; the others name the text, the
# modality or the image.
_PROMPT_REASONS = ("bad_prompt", "prompt_out_of_bounds", "corrupt_mask", "mask_size_mismatch")


def validate_request(record, *, image: str = "image", text: str = "text",
                     modality: str = "modality", prompts: Sequence[str] | None = None) -> None:
  """Checks a request with what needs no model, so that a bad one is refused before loading:
  the image decodes, the modality is known, every prompt is well formed and inside the image,
  each <vpK> names a prompt. These are the training path's own checks (schema.validate after
  decoding, as examples.ExampleProcessor does); what depends on the model's config (slot counts,
  length) is checked by `Predictor.prepare`.

  image, text, modality, prompts: how the error names each part (e.g. "--box '1,2,3,4'").
  Raises InferenceError "<part>: <reason>: <what>".
  """
  from data_pipelines import preprocess, schema
  prompts = list(prompts) if prompts is not None else [
      f"prompt {i + 1}" for i in range(len(record.prompts))]
  try:
    height, width = preprocess.decode_image(record.image).shape[:2]
  except ValueError as e:
    raise InferenceError(f"{image}: corrupt_image: {e}") from None
  try:
    schema.validate(record, width, height)
  except schema.BadRecordError as e:
    field = {"unknown_modality": modality, "corrupt_image": image}.get(e.reason, text)
    if e.reason in _PROMPT_REASONS:  # which prompt: the first that fails on its own
      for i, prompt in enumerate(record.prompts):
        alone = dataclasses.replace(record, turns=(template.IMAGE_PLACEHOLDER, "-"),
                                    prompts=(prompt,), masks=())
        try:
          schema.validate(alone, width, height)
        except schema.BadRecordError:
          field = prompts[i]
          break
    raise InferenceError(f"{field}: {e}") from None


def parse_prompt_flag(kind: str, value: str, image_hw: tuple[int, int] | None = None):
  """`--point x,y`, `--box x1,y1,x2,y2`, `--scribble FILE.png | x,y;x,y;...[;closed]`."""
  from data_pipelines import schema
  if kind == "scribble" and not any(c in value for c in ",;"):
    path = pathlib.Path(value)
    if not path.is_file():
      raise InferenceError(f"--scribble: {value!r} is neither a mask PNG nor a point list")
    return schema.VisualPrompt("mask", np.zeros((0, 2), np.float32), mask=path.read_bytes())
  try:
    if kind == "scribble":
      parts = [p for p in value.split(";") if p]
      closed = parts[-1] == "closed"
      pts = np.array([[float(v) for v in p.split(",")] for p in parts[:-1 if closed else None]],
                     np.float32)
      if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError
      return schema.VisualPrompt("polygon" if closed else "scribble", pts)
    values = [float(v) for v in value.split(",")]
  except ValueError:
    raise InferenceError(f"--{kind}: cannot parse {value!r}") from None
  want = {"point": 2, "box": 4}[kind]
  if len(values) != want or not np.isfinite(values).all():
    raise InferenceError(f"--{kind}: expected {want} finite numbers, got {value!r}")
  return schema.VisualPrompt(kind, np.asarray(values, np.float32).reshape(-1, 2))


class Predictor:
  """A trained model ready to answer: `Predictor.from_workdir(dir)(image, modality, text)`."""

  def __init__(self, config: ml_collections.ConfigDict, params: Any, tokenizer):
    from data_pipelines import examples
    self.config = config
    self.tokenizer = tokenizer
    self.generator = Generator(config, params)
    self.processor = examples.ExampleProcessor(config, tokenizer)

  @classmethod
  def from_workdir(cls, workdir: str | os.PathLike, step: int | None = None) -> Predictor:
    """Loads config, tokenizer and the params of `step` (default: newest usable) of a run.
    Read-only: a training job may be saving into the workdir meanwhile."""
    from earthgptx_jax import checkpointing, tokenizer as tok
    workdir = pathlib.Path(workdir)
    config_file = workdir / "config.json"
    if not config_file.is_file():
      raise InferenceError(f"--workdir: {workdir} has no config.json (not a training workdir)")
    config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    _tuples(config)
    tokenizer_dir = workdir / "tokenizer"
    if not tokenizer_dir.is_dir():
      raise InferenceError(f"--workdir: {workdir} has no tokenizer/ folder")
    tokenizer = tok.load_tokenizer(str(tokenizer_dir))
    try:
      _, params = checkpointing.load_params(workdir, config, step)
    except checkpointing.CheckpointNotFoundError as e:
      raise InferenceError(f"{'--workdir' if step is None else '--step'}: {e}") from None
    except checkpointing.NoUsableCheckpointError as e:
      raise InferenceError(f"{'' if step is None else '--step: '}{e}") from None
    return cls(config, params, tokenizer)

  def prepare(self, records) -> tuple[dict[str, np.ndarray], list]:
    """Records -> (prompt-only batch, records); errors name the request and the field."""
    from data_pipelines import schema
    from earthgptx_jax import batch as batch_lib, evaluate
    batch = batch_lib.example_batch(self.config, len(records))
    for i, record in enumerate(records):
      try:
        example = self.processor.process(record_features(record))
      except schema.BadRecordError as e:
        raise InferenceError(f"request {i}: {e}") from None
      for k, v in example.items():
        batch[k][i] = v
    prompt_batch, _ = evaluate.truncate_to_question(batch, int(self.config.model.token_ids.pad))
    return prompt_batch, records

  def predict(self, records, *, max_new_tokens: int = 64, temperature: float = 0.0,
              top_p: float = 1.0, seed: int = 0) -> list[Prediction]:
    from earthgptx_jax.models import pixel
    batch, records = self.prepare(records)
    generated = self.generator(batch, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, seed=seed)
    seg_id = int(self.config.model.token_ids.seg)
    out = []
    for i in range(len(records)):
      ids = generated.tokens[i, :generated.lengths[i]].tolist()
      height, width = (int(v) for v in batch["image_size"][i])
      answer = answer_text(ids, self.tokenizer, self.config,
                           generated.boxes[i][generated.box_valid[i]],
                           batch["view_affine"][i, 0], (height, width))
      n_seg = ids.count(seg_id)
      if n_seg:
        answer = (answer + " " + " ".join([template.SEG] * n_seg)).strip()
      try:
        boxes, error = template.parse_coordinates(answer, width, height).boxes, None
      except template.CoordinateParseError as e:
        boxes, error = [], str(e)
      masks, scores = [], []
      for q in range(generated.seg_valid.shape[1]):
        if generated.seg_valid[i, q]:
          masks.append(np.asarray(pixel.postprocess_masks(
              generated.mask_logits[i, q], (height, width),
              int(self.config.model.vision.image_size), binarize=True,
              threshold=float(self.config.model.pixel.mask_threshold))))
          scores.append(float(generated.iou[i, q]))
      out.append(Prediction(answer, boxes, masks, scores, error))
    return out

  def __call__(self, image: bytes | str | os.PathLike, modality: str, text: str,
               prompts: Sequence[Any] = (), **kwargs) -> Prediction:
    image_bytes = image if isinstance(image, bytes) else _read_image(image)
    return self.predict([_request_record(image_bytes, modality, text, prompts)], **kwargs)[0]


def record_features(record) -> dict:
  """A schema.Record as the stored feature dict the example processor reads."""
  from data_pipelines import schema
  return schema.to_features(record)


def _read_image(path) -> bytes:
  path = pathlib.Path(path)
  if not path.is_file():
    raise InferenceError(f"--image: {str(path)!r} does not exist")
  return path.read_bytes()


def _tuples(config: ml_collections.ConfigDict) -> None:
  """JSON turns tuples into lists; the config's tuple fields (mesh shape, ...) want tuples."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      _tuples(value)
    elif isinstance(value, list):
      with config.ignore_type():
        config[key] = tuple(value)


# ----------------------------------------------------------------------------------------------
# Overlay.

_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180)]
# The user's prompts: bright cyan over a black halo, so they show on hot (white) infrared
# targets and on dark sea alike; predictions use _COLOURS over the same halo.
_PROMPT_COLOUR = (0, 255, 255)
_HALO = (0, 0, 0)


class _Pen(NamedTuple):
  line: int  # stroke width (px)
  halo: int  # dark border on each side of a stroke (px)
  font: Any  # PIL font for labels


def _pen(height: int, width: int) -> _Pen:
  """Stroke and label sizes proportional to the image's short side (a 4592x3072 scene gets
  8 px lines and 77 px labels), with minimums that keep small images readable."""
  from PIL import ImageFont
  short = min(height, width)
  line = max(2, round(short / 400))
  size = max(13, round(short / 40))
  try:
    font = ImageFont.load_default(size=size)  # scalable since Pillow 10.1
  except TypeError:  # older Pillow: the fixed bitmap font
    font = ImageFont.load_default()
  return _Pen(line, max(1, round(line / 2)), font)


def _label(draw, xy, text: str, colour, pen: _Pen) -> None:
  draw.text(xy, text, fill=colour, font=pen.font, stroke_width=pen.halo, stroke_fill=_HALO)


def _rectangle(draw, box, colour, pen: _Pen) -> None:
  x1, y1, x2, y2 = (float(v) for v in box)
  h = pen.halo
  draw.rectangle([x1 - h, y1 - h, x2 + h, y2 + h], outline=_HALO, width=pen.line + 2 * h)
  draw.rectangle([x1, y1, x2, y2], outline=colour, width=pen.line)


def _box_label(draw, box, text: str, colour, pen: _Pen) -> None:
  """A box's label just above its top-left corner (inside it at the image's top edge), clear
  of any box drawn inside it."""
  x1, y1 = float(box[0]), float(box[1])
  left, _, _, bottom = draw.textbbox((0, 0), text, font=pen.font, stroke_width=pen.halo)
  above = y1 - pen.halo - bottom - pen.halo
  pad = pen.line + 2 * pen.halo
  _label(draw, (x1 - left, above) if above >= 0 else (x1 + pad, y1 + pad), text, colour, pen)


def render_overlay(image_bytes: bytes, modality: str, prompts, prediction: Prediction,
                   preprocess_cfg) -> "Image.Image":
  """The image (as the model sees it after per-modality preprocessing), the user's prompts
  (cyan, labelled vp1..), predicted boxes (coloured, labelled box1..) and masks (tinted).
  Every stroke and label has a dark halo; sizes scale with the image (`_pen`)."""
  from PIL import Image, ImageDraw
  from data_pipelines import preprocess, schema
  pixels = preprocess.preprocess(preprocess.decode_image(image_bytes), modality, preprocess_cfg)
  height, width = pixels.shape[:2]
  canvas = (np.clip(pixels, 0, 1) * 255).astype(np.float32)
  for q, mask in enumerate(prediction.masks):
    colour = np.asarray(_COLOURS[q % len(_COLOURS)], np.float32)
    canvas[mask] = 0.5 * canvas[mask] + 0.5 * colour
  for p in prompts:  # mask prompts are tinted before anything is drawn over them
    if p.kind == "mask":
      m = schema.decode_mask(p.mask, width, height)
      canvas[m] = 0.5 * canvas[m] + 0.5 * np.asarray(_PROMPT_COLOUR, np.float32)
  img = Image.fromarray(canvas.astype(np.uint8))
  draw = ImageDraw.Draw(img)
  pen = _pen(height, width)
  pad = pen.line + 2 * pen.halo  # labels start clear of the stroke they name
  for k, p in enumerate(prompts):
    label = f"vp{k + 1}"
    pts = np.asarray(p.points, np.float32).reshape(-1, 2)
    if p.kind == "point":
      x, y = (float(v) for v in pts[0])
      r, h = 3 * pen.line + 2, pen.halo
      draw.ellipse([x - r - h, y - r - h, x + r + h, y + r + h], outline=_HALO,
                   width=pen.line + 2 * h)
      draw.ellipse([x - r, y - r, x + r, y + r], outline=_PROMPT_COLOUR, width=pen.line)
      _label(draw, (x + r + pad, y - r), label, _PROMPT_COLOUR, pen)
    elif p.kind == "box":
      _rectangle(draw, pts.reshape(-1), _PROMPT_COLOUR, pen)
      _box_label(draw, pts.reshape(-1), label, _PROMPT_COLOUR, pen)
    elif p.kind in ("polygon", "scribble"):
      xy = [tuple(map(float, v)) for v in pts] + (
          [tuple(map(float, pts[0]))] if p.kind == "polygon" else [])
      draw.line(xy, fill=_HALO, width=pen.line + 2 * pen.halo, joint="curve")
      draw.line(xy, fill=_PROMPT_COLOUR, width=pen.line, joint="curve")
      _label(draw, (float(pts[0][0]) + pad, float(pts[0][1]) + pad), label, _PROMPT_COLOUR, pen)
    else:
      ys, xs = np.nonzero(schema.decode_mask(p.mask, width, height))
      if len(xs):
        _label(draw, (float(xs.min()), float(ys.min())), label, _PROMPT_COLOUR, pen)
  for b, box in enumerate(prediction.boxes):
    colour = _COLOURS[b % len(_COLOURS)]
    _rectangle(draw, box, colour, pen)
    _box_label(draw, box, f"box{b + 1}", colour, pen)
  return img


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


# ----------------------------------------------------------------------------------------------
# CLI.

def _define_flags() -> None:
  """CLI flags, defined only when run as a program: the module is also a library
  imported by train.py, whose own flags would collide."""
  global _WORKDIR, _STEP, _IMAGE, _MODALITY, _TEXT, _POINTS, _BOXES, _SCRIBBLES, _OUT, _REQUESTS, _RESULTS, _MAX_NEW, _TEMPERATURE, _TOP_P, _SEED
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


def _prompts_from(points, boxes, scribbles):
  # Prompts are numbered in this order: points, then boxes, then scribbles.
  return ([parse_prompt_flag("point", v) for v in points]
          + [parse_prompt_flag("box", v) for v in boxes]
          + [parse_prompt_flag("scribble", v) for v in scribbles])


def _prediction_json(p: Prediction) -> dict:
  from data_pipelines import schema
  return {"answer": p.answer, "boxes": [list(map(float, b)) for b in p.boxes],
          "parse_error": p.parse_error, "mask_scores": p.mask_scores,
          "mask_boxes": [list(schema.mask_to_box(m)) if m.any() else None for m in p.masks]}


def run(argv) -> int:
  del argv
  paths.resolve_flags("workdir", "image", "out", "requests", "results")
  if not _WORKDIR.value:
    raise InferenceError("--workdir: required")
  kwargs = dict(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                top_p=_TOP_P.value, seed=_SEED.value)
  if _REQUESTS.value:
    if not _RESULTS.value:
      raise InferenceError("--results: required with --requests")
    lines = pathlib.Path(_REQUESTS.value).read_text().splitlines()
    requests = []
    for n, line in enumerate(l for l in lines if l.strip()):
      where = f"--requests line {n + 1}"
      try:
        r = json.loads(line)
        kinds = {k: list(r.get(k, [])) for k in ("points", "boxes", "scribbles")}
        record = _request_record(_read_image(r["image"]), r.get("modality", "optical"),
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
    predictor = Predictor.from_workdir(_WORKDIR.value, _STEP.value)
    predictions = predictor.predict(requests, **kwargs)
    _write_atomic(pathlib.Path(_RESULTS.value), lambda tmp: pathlib.Path(tmp).write_text(
        "".join(json.dumps(_prediction_json(p)) + "\n" for p in predictions)))
    print(f"wrote {len(predictions)} results to {_RESULTS.value}")
    return 0
  if not _IMAGE.value or _TEXT.value is None:
    raise InferenceError("--image and --text: required (or --requests for batch mode)")
  image_bytes = _read_image(_IMAGE.value)
  prompts = _prompts_from(_POINTS.value, _BOXES.value, _SCRIBBLES.value)
  if _OUT.value and not pathlib.Path(_OUT.value).resolve().parent.is_dir():
    raise InferenceError(f"--out: folder of {_OUT.value!r} does not exist")
  # Everything that needs no model is checked before the model is loaded.
  validate_request(
      _request_record(image_bytes, _MODALITY.value, _TEXT.value, prompts),
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
    image = render_overlay(image_bytes, _MODALITY.value, prompts, prediction,
                           predictor.config.model.vision.preprocess)
    _write_atomic(pathlib.Path(_OUT.value), lambda tmp: image.save(tmp, format="PNG"))
    print(f"overlay written to {_OUT.value}")
  return 0


def main(argv):
  try:
    sys.exit(run(argv))
  except (InferenceError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
