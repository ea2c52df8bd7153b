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
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import linen as nn

from earthgptx_jax import sharding, template
from earthgptx_jax.models import decoding, earthgptx, llama


@dataclasses.dataclass
class Prediction:
  answer: str
  boxes: list[tuple[float, float, float, float]]  # parsed from the answer, original pixels
  masks: list[np.ndarray]  # one bool [H, W] per generated [SEG], original frame
  mask_scores: list[float]  # the decoder's predicted IoU per mask
  parse_error: str | None = None  # the answer held malformed coordinates


class Generator:
  """Jitted multimodal generation: visual prefill -> KV-cached LLM decoding -> [SEG] masks."""

  def __init__(self, config: ml_collections.ConfigDict, params: Any, mesh=None):
    self.config = config
    self.params = params
    self.mesh = mesh
    self.model = earthgptx.EarthGPTX(config.model)
    self.llm = llama.Llama(config.model.llm)
    self._prefill = jax.jit(self._prefill_impl)
    self._masks = jax.jit(self._masks_impl)

  def _prefill_impl(self, params, batch):
    image_llm, prompt_llm, dense = self.model.apply(
        {"params": params}, batch, method=earthgptx.EarthGPTX.encode_visual)
    embeds = self.model.apply({"params": params}, batch, image_llm, prompt_llm,
                              method=earthgptx.EarthGPTX.embed_inputs)
    return embeds, dense

  def _masks_impl(self, params, hidden, tokens, pixel_values, dense):
    return self.model.apply({"params": params}, hidden, tokens, pixel_values, dense,
                            method=earthgptx.EarthGPTX.decode_masks)

  def __call__(self, batch: dict[str, np.ndarray], *, max_new_tokens: int,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
    """batch: prompt-only model batch (batch.py) -> (tokens [B,N], lengths [B], mask logits
    [B,Q,S,S], iou [B,Q], seg valid [B,Q])."""
    ids = self.config.model.token_ids
    with contextlib.ExitStack() as stack:
      if self.mesh is not None:  # params live on the training mesh: replicate the batch there
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES))
        batch = jax.device_put(dict(batch), sharding.replicated(self.mesh))
      else:
        batch = jax.tree.map(jnp.asarray, batch)
      embeds, dense = self._prefill(self.params, batch)
      out = decoding.generate(self.llm, self.params["llm"], inputs_embeds=embeds,
                              attention_mask=batch["attention_mask"],
                              max_new_tokens=max_new_tokens, eos_id=int(ids.eos),
                              pad_id=int(ids.pad), rng=jax.random.key(seed),
                              temperature=temperature, top_p=top_p, return_hidden_states=True)
      mask_logits, iou, valid = self._masks(self.params, out.hidden_states, out.tokens,
                                            batch["pixel_values"], dense)
    return (np.asarray(out.tokens), np.asarray(out.lengths), np.asarray(mask_logits),
            np.asarray(iou), np.asarray(valid))
