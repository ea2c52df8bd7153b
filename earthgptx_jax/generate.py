"""Generation with a trained EarthGPT-X, and the one decoder of what it generates.

`Generator` runs visual prefill -> KV-cached LLM decoding -> [SEG] masks and [BOX] boxes as
jitted functions of (params, batch): create one per model config and call it with any params
(e.g. every evaluation during training), so they are traced and compiled once per batch shape.
`decode_row` turns one generated row into what a user and the metrics read: the answer text
(each [BOX] written as the box head's box), its parsed boxes, and the [SEG] masks in the
original image's frame; evaluation and the predictor both use it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils

from earthgptx_jax import geometry, sharding, template
from earthgptx_jax.models import decoding, earthgptx, llama, pixel


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


def truncate_to_question(batch: Mapping[str, np.ndarray], pad_id: int) -> tuple[dict, np.ndarray]:
  """Cuts every row before its last answer (right padding) -> (prompt-only batch, cut index).

  The last answer's first token is the first position after the last run of `loss_mask`
  starts (loss_mask[t] marks targets[t] = input_ids[t + 1] as an answer token).
  """
  out = {k: np.array(v) for k, v in batch.items()}
  length = out["input_ids"].shape[1]
  cuts = np.zeros(len(out["input_ids"]), np.int64)
  for i, mask in enumerate(out["loss_mask"]):
    if not mask.any():
      cuts[i] = int(out["attention_mask"][i].nonzero()[0].max() + 1) if out[
          "attention_mask"][i].any() else 1
      continue
    starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
    cuts[i] = starts[-1] + 1
  position = np.arange(length)[None, :]
  keep = position < cuts[:, None]
  out["input_ids"] = np.where(keep, out["input_ids"], pad_id).astype(np.int32)
  out["attention_mask"] = out["attention_mask"] & keep
  out["vp_token_index"] = np.where(keep, out["vp_token_index"], -1).astype(np.int32)
  out["loss_mask"] = np.zeros_like(out["loss_mask"])
  out["targets"] = np.where(keep, out["targets"], pad_id).astype(np.int32)
  return out, cuts


class _TokenSink:
  """The one host callback a Generator's compiled loop calls (one callable, so one
  compilation), forwarding each step to the streaming caller of the moment."""

  def __init__(self):
    self.target: Callable[[int, np.ndarray], None] | None = None

  def __call__(self, step, tokens) -> None:
    if self.target is not None:
      self.target(int(step), np.asarray(tokens))


class Generator:
  """Jitted multimodal generation: visual prefill -> KV-cached LLM decoding -> [SEG] masks and
  [BOX] boxes. Params are an argument, so one Generator serves every checkpoint of a config."""

  def __init__(self, config: ml_collections.ConfigDict, mesh=None, programs=None):
    """programs(name, jitted) -> a callable used in its place (e.g. programs.for_model)."""
    self.config = config
    self.mesh = mesh
    self.model = earthgptx.EarthGPTX(config.model)
    # One Llama for the Generator's life: decoding.generate compiles per module identity.
    self.llm = llama.Llama(config.model.llm)
    keep = programs or (lambda name, jitted: jitted)
    self._prefill = keep("prefill", jax.jit(self._prefill_impl))
    self._heads = keep("heads", jax.jit(self._heads_impl))
    self._sink = _TokenSink()
    self._streaming = threading.Lock()  # one streaming caller at a time owns the sink

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

  def __call__(self, params: Any, batch: Mapping[str, np.ndarray], *, max_new_tokens: int,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
               on_token: Callable[[int, np.ndarray], None] | None = None) -> Generated:
    """params: the model's params; batch: prompt-only model batch (batch.py) -> Generated.
    on_token(step, tokens [B]): called on the host as each token is generated (streaming)."""
    if on_token is None:
      return self._generate(params, batch, max_new_tokens, temperature, top_p, seed, None)
    with self._streaming:
      self._sink.target = on_token
      try:
        return self._generate(params, batch, max_new_tokens, temperature, top_p, seed,
                              self._sink)
      finally:
        self._sink.target = None

  def _generate(self, params, batch, max_new_tokens, temperature, top_p, seed,
                sink) -> Generated:
    ids = self.config.model.token_ids
    with contextlib.ExitStack() as stack:
      if self.mesh is not None:  # params live on the training mesh: split the batch there
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES))
        batch = _on_mesh(batch, self.mesh)
      else:  # device_put converts on the host; jnp.asarray compiles a program per dtype
        batch = jax.device_put(dict(batch))
      embeds, dense, box_features = self._prefill(params, batch)
      out = decoding.generate(self.llm, params["llm"], inputs_embeds=embeds,
                              attention_mask=batch["attention_mask"],
                              max_new_tokens=max_new_tokens, eos_id=int(ids.eos),
                              pad_id=int(ids.pad), rng=jax.random.key(seed),
                              temperature=temperature, top_p=top_p, return_hidden_states=True,
                              on_token=sink)
      heads = self._heads(params, out.hidden_states, out.tokens, batch["pixel_values"],
                          dense, box_features)
      # Converted inside: the caller's sink is released only once every step has reached it.
      return Generated(_to_host(out.tokens), _to_host(out.lengths),
                       *(_to_host(x) for x in heads))


def _on_mesh(batch: Mapping[str, Any], mesh) -> dict[str, jax.Array]:
  """The whole batch, which every process holds, as global arrays split over data x fsdp like
  the training batch (each process puts the rows its devices hold); replicated when the rows
  do not split evenly (e.g. one prompt)."""
  split = mesh.shape["data"] * mesh.shape["fsdp"]
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    target = (sharding.batch_sharding(mesh, v.ndim) if v.ndim and v.shape[0] % split == 0
              else sharding.replicated(mesh))
    out[k] = jax.make_array_from_callback(v.shape, target, lambda index, v=v: v[index])
  return out


def _to_host(x) -> np.ndarray:
  """All of `x` as numpy on every process: gathered when other processes hold parts of it."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def answer_text(ids: Sequence[int], tokenizer, config: ml_collections.ConfigDict,
                boxes: np.ndarray, global_affine: np.ndarray, image_hw: tuple[int, int]) -> str:
  """Generated ids -> the answer as text: [SEG] tokens removed (their masks are returned
  apart), each [BOX] written as the box head's box in the `[x1,y1,x2,y2]` format (template.py),
  whitespace collapsed.

  boxes: [Qb, 4] the head's boxes in the global view in [0, 1], in [BOX] order;
  global_affine: [2, 3] the global view's affine (batch.py `view_affine[:, 0]`);
  image_hw: the original (height, width).
  """
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


def decode_row(generated: Generated, i: int, batch: Mapping[str, np.ndarray], tokenizer,
               config: ml_collections.ConfigDict, *, max_masks: int | None = None) -> Prediction:
  """Row `i` of `generated` (for row `i` of the prompt batch it came from) -> its Prediction.

  The answer is `answer_text` followed by one `[SEG]` per generated [SEG] token; its boxes are
  parsed from it (malformed coordinates: no boxes and `parse_error`); one bool mask per valid
  [SEG] slot (slots fill in text order), mapped back to the original image as SAM
  post-processes, with the decoder's predicted IoU. max_masks: decode at most this many
  masks (a caller that scores only the first few need not resize the rest).
  """
  ids = generated.tokens[i, :generated.lengths[i]].tolist()
  height, width = (int(v) for v in batch["image_size"][i])
  answer = answer_text(ids, tokenizer, config, generated.boxes[i][generated.box_valid[i]],
                       batch["view_affine"][i, 0], (height, width))
  n_seg = ids.count(int(config.model.token_ids.seg))
  if n_seg:
    answer = (answer + " " + " ".join([template.SEG] * n_seg)).strip()
  try:
    boxes, error = template.parse_coordinates(answer, width, height).boxes, None
  except template.CoordinateParseError as e:
    boxes, error = [], str(e)
  slots = generated.seg_valid.shape[1] if max_masks is None else min(
      max_masks, generated.seg_valid.shape[1])
  masks, scores = [], []
  for q in range(slots):
    if generated.seg_valid[i, q]:
      masks.append(pixel.postprocess_masks(
          generated.mask_logits[i, q], (height, width), int(config.model.vision.image_size),
          binarize=True, threshold=float(config.model.pixel.mask_threshold)))
      scores.append(float(generated.iou[i, q]))
  return Prediction(answer, boxes, masks, scores, error)
