"""A trained model ready to answer requests: `Predictor.from_workdir(DIR)(image, modality, text,
prompts)` -> `generate.Prediction`, or `predict(records)` for many at once.

Requests go through exactly the training example path (decoding, per-modality preprocessing,
views, rasterisation, template), and what needs no model is checked before loading one
(`validate_request`), each error one line naming the flag or field.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np

from data_pipelines import examples, preprocess, schema
from earthgptx_jax import batch as batch_lib
from earthgptx_jax import checkpointing, generate, programs, template
from earthgptx_jax import tokenizer as tokenizer_lib


class InferenceError(ValueError):
  """A request the model cannot answer (bad image, prompt, modality, path): one clear line."""


def request_record(image_bytes: bytes, modality: str, text: str, prompts: Sequence[Any],
                   history: Sequence[tuple[str, str]] = ()) -> schema.Record:
  """A schema.Record for one request. The answer turn is a stand-in that is cut off before
  generation (generate.truncate_to_question), so requests go through exactly the training
  example path: decoding, per-modality preprocessing, views, rasterisation, template.

  history: the conversation's earlier (question, answer) turns, oldest first (multi-turn
  chat); they become the record's first turns, as multi-turn training records hold them.
  """
  turns = [t for question, answer in history for t in (question, _history_answer(answer))]
  turns += [text, "-"]
  if template.IMAGE_PLACEHOLDER not in turns[0]:
    turns[0] = f"{template.IMAGE_PLACEHOLDER}\n{turns[0]}"
  return schema.Record(id="request", image=image_bytes, modality=modality, source="request",
                       task="vqa", turns=tuple(turns), prompts=tuple(prompts))


def _history_answer(answer: str) -> str:
  """An earlier answer as a record's ASSISTANT turn: its [SEG]s dropped (their masks are not
  text, and a record's [SEG]s need target masks), malformed coordinates kept as plain text
  (a training record with them is refused as bad_answer_box)."""
  answer = " ".join(answer.replace(template.SEG, " ").split())
  try:
    template.parse_coordinates(answer, 1, 1)
  except template.CoordinateParseError:
    answer = answer.replace("[", "(").replace("]", ")")
  return answer or "-"


def read_image(path: str | os.PathLike) -> bytes:
  path = pathlib.Path(path)
  if not path.is_file():
    raise InferenceError(f"--image: {str(path)!r} does not exist")
  return path.read_bytes()


# BadRecordError reasons caused by one prompt, traced to it; the others name the text, the
# modality or the image.
_PROMPT_REASONS = ("bad_prompt", "prompt_out_of_bounds", "corrupt_mask", "mask_size_mismatch")


def validate_request(record: schema.Record, *, image: str = "image", text: str = "text",
                     modality: str = "modality", prompts: Sequence[str] | None = None) -> None:
  """Checks a request with what needs no model, so that a bad one is refused before loading:
  the image decodes, the modality is known, every prompt is well formed and inside the image,
  each <vpK> names a prompt. These are the training path's own checks (schema.validate after
  decoding, as examples.ExampleProcessor does); what depends on the model's config (slot counts,
  length) is checked by `Predictor.prepare`.

  image, text, modality, prompts: how the error names each part (e.g. "--box '1,2,3,4'").
  Raises InferenceError "<part>: <reason>: <what>".
  """
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


def parse_prompt_flag(kind: str, value: str) -> schema.VisualPrompt:
  """`--point x,y`, `--box x1,y1,x2,y2`, `--scribble FILE.png | x,y;x,y;...[;closed]`."""
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


def load_workdir(workdir: str | os.PathLike, step: int | None = None
                 ) -> tuple[ml_collections.ConfigDict, Any, Any]:
  """(config, tokenizer, params of `step`, default the newest usable) of a training workdir.
  Read-only: a training job may be saving into the workdir meanwhile."""
  workdir = pathlib.Path(workdir)
  tokenizer_dir = workdir / "tokenizer"
  if (workdir / "config.json").is_file() and not tokenizer_dir.is_dir():
    raise InferenceError(f"--workdir: {workdir} has no tokenizer/ folder")
  try:
    config, _, params = checkpointing.load_workdir_params(workdir, step)
  except checkpointing.WorkdirReadError as e:
    raise InferenceError(str(e)) from None
  return config, tokenizer_lib.load_saved_tokenizer(tokenizer_dir), params


def prediction_json(p: generate.Prediction) -> dict:
  """A prediction as JSON (infer's --results lines, the demo's answer download)."""
  return {"answer": p.answer, "boxes": [list(map(float, b)) for b in p.boxes],
          "parse_error": p.parse_error, "mask_scores": p.mask_scores,
          "mask_boxes": [list(schema.mask_to_box(m)) if m.any() else None for m in p.masks]}


def _answers(loss_mask: np.ndarray) -> int:
  """How many answers an example kept: runs of its loss mask (questions separate them)."""
  mask = np.asarray(loss_mask, bool)
  return int((mask & ~np.concatenate([[False], mask[:-1]])).sum())


class Predictor:
  """A trained model ready to answer: `Predictor.from_workdir(dir)(image, modality, text)`."""

  def __init__(self, config: ml_collections.ConfigDict, params: Any, tokenizer):
    self.config = config
    self.params = params
    self.tokenizer = tokenizer
    # Its programs kept across processes where XLA's cache is on: a new process skips tracing.
    self.generator = generate.Generator(config, programs=programs.for_model(config))
    self.processor = examples.ExampleProcessor(config, tokenizer)

  @classmethod
  def from_workdir(cls, workdir: str | os.PathLike, step: int | None = None) -> Predictor:
    """Loads config, tokenizer and the params of `step` (default: newest usable) of a run.
    Read-only: a training job may be saving into the workdir meanwhile."""
    config, tokenizer, params = load_workdir(workdir, step)
    return cls(config, params, tokenizer)

  def prepare(self, records: Sequence[schema.Record]
              ) -> tuple[dict[str, np.ndarray], Sequence[schema.Record]]:
    """Records -> (prompt-only batch, records); errors name the request and the field."""
    batch = batch_lib.example_batch(self.config, len(records))
    records = list(records)
    for i, record in enumerate(records):
      records[i], example = self._process(record, f"request {i}")
      for k, v in example.items():
        batch[k][i] = v
    prompt_batch, _ = generate.truncate_to_question(batch,
                                                    int(self.config.model.token_ids.pad))
    return prompt_batch, records

  def _process(self, record: schema.Record, name: str) -> tuple[schema.Record, dict]:
    """(record, example); a conversation too long (or with too many answer boxes) for the
    model loses its oldest turns, never the question being asked."""
    while True:
      try:
        example = self.processor.process(schema.to_features(record))
        if len(record.turns) <= 2 or _answers(example["loss_mask"]) == len(record.turns) // 2:
          return record, example
      except schema.BadRecordError as e:
        if len(record.turns) <= 2:
          raise InferenceError(f"{name}: {e}") from None
      first = record.turns[2]  # the image placeholder moves to the new first question
      record = dataclasses.replace(record, turns=(
          first if template.IMAGE_PLACEHOLDER in first else
          f"{template.IMAGE_PLACEHOLDER}\n{first}", *record.turns[3:]))

  def predict(self, records: Sequence[schema.Record], *, max_new_tokens: int = 64,
              temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
              on_token=None) -> list[generate.Prediction]:
    """on_token(step, tokens [B]): called as each token is generated (see `stream`)."""
    batch, records = self.prepare(records)
    generated = self.generator(self.params, batch, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, seed=seed,
                               on_token=on_token)
    return [generate.decode_row(generated, i, batch, self.tokenizer, self.config)
            for i in range(len(records))]

  def stream(self, record: schema.Record, **kwargs) -> Iterator[str | generate.Prediction]:
    """Answers one request as it is generated: yields the answer so far (text, growing token
    by token), then its final `generate.Prediction` (boxes written, masks decoded) — the same
    computation as `predict`, which runs in a worker thread while this yields."""
    updates: queue.Queue = queue.Queue()

    def run():
      try:
        updates.put(self.predict([record], on_token=lambda _, tokens: updates.put(
            int(tokens[0])), **kwargs)[0])
      except Exception as e:  # pylint: disable=broad-except  (re-raised in the caller)
        updates.put(e)

    threading.Thread(target=run, daemon=True).start()
    ids = self.config.model.token_ids
    hidden = {int(ids.eos), int(ids.pad), int(ids.seg)}
    answer: list[int] = []
    while True:
      item = updates.get()
      if isinstance(item, Exception):
        raise item
      if isinstance(item, generate.Prediction):
        yield item
        return
      if item not in hidden:
        answer.append(item)
        yield self.tokenizer.decode(answer, skip_special_tokens=True)

  def __call__(self, image: bytes | str | os.PathLike, modality: str, text: str,
               prompts: Sequence[Any] = (), **kwargs) -> generate.Prediction:
    image_bytes = image if isinstance(image, bytes) else read_image(image)
    return self.predict([request_record(image_bytes, modality, text, prompts)], **kwargs)[0]
