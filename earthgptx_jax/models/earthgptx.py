"""EarthGPT-X: the thin composite of encoders, visual prompts, LLM and pixel decoder.

    pixel_values [B,V,S,S,3] -> MixedVisionEncoder -> image tokens [B,N,C], dense [B,h,w,Cd]
    prompt maps/geometry     -> VisualPromptEncoder -> prompt embeds [B,P,K,Dp]
    (image tokens, prompt embeds) -> ContentIntegration -> [B,N,H], [B,P,K,H]
      prompt tokens + RegionEncoder(RoIAlign in each prompt's box, global-view maps) [B,P,1,H]
    text embeddings with image / prompt tokens spliced in at <im_patch> / <vp_patch> -> Llama
    last-layer hidden state that predicts each [SEG] -> PixelDecoder(dense) -> mask logits
    ... and each [BOX] (model.box.head) -> BoxHead(global-view ConvNeXt map) -> box

Splicing and [SEG] gathering use only static shapes (cumsum + take_along_axis + where), so the
whole forward jits once per config. As in LISA, the hidden state used for a [SEG] (or [BOX]) is
the one *at the position that predicts it* (`targets == [SEG]`); generation reads the same
state, the one that emitted the token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from earthgptx_jax.models import (box_head, convnext, integration, llama, pixel, prompts, regions,
                                  vision, vit)


class EarthGPTXOutput(NamedTuple):
  logits: jax.Array  # [B, L, V]
  hidden_states: jax.Array  # [B, L, H], last layer after the final norm
  mask_logits: jax.Array  # [B, Q, S, S], global-view frame
  iou_scores: jax.Array  # [B, Q]
  seg_valid: jax.Array  # [B, Q]: a [SEG] exists at that slot
  boxes: jax.Array  # [B, Qb, 4], global view in [0, 1] (zeros with the box head off)
  box_valid: jax.Array  # [B, Qb]: a [BOX] exists at that slot
  box_cell_logits: jax.Array  # [B, Qb, h, w] the box head's cell logits ([B, Qb, 1, 1] if off)


class VisualFeatures(NamedTuple):
  image_llm: jax.Array  # [B, N, H] image tokens at LLM width
  prompt_llm: jax.Array  # [B, P, K, H] prompt tokens at LLM width
  dense: jax.Array  # [B, h, w, C] the pixel decoder's map
  box_features: jax.Array  # [B, h, w, C] the box head's global-view map ([B, 0, 0, 0] if off)


def check_config(config: ml_collections.ConfigDict) -> None:
  """The encoders' and the LLM's own checks of `config` (= config.model), run before a run
  writes anything: each raises a ValueError naming the field it cannot build."""
  llama.check_config(config.llm)
  convnext.check_config(config.vision.convnext)
  vit.check_config(config.vision.dino)
  vit.check_config(config.prompt.sae)


def token_id(config: ml_collections.ConfigDict, name: str) -> int:
  value = config.token_ids.get(name, None)
  if value is None or value < 0:
    raise ValueError(f"config.model.token_ids.{name}: unset ({value!r}); the trainer fills it "
                     "from the tokenizer (earthgptx_jax.tokenizer)")
  return int(value)


def splice_tokens(text_embeds, input_ids, vp_token_index, image_embeds, prompt_embeds,
                  image_patch_id: int):
  """Places image and prompt tokens at their placeholder positions.

  text_embeds [B,L,H]; input_ids, vp_token_index [B,L]; image_embeds [B,N,H] (in order of the
  <im_patch> positions); prompt_embeds [B,P,K,H] (a <vp_patch> at position t holds prompt token
  vp_token_index[t] of the flattened [P*K]).
  """
  b, n, h = image_embeds.shape
  is_image = input_ids == image_patch_id
  image_slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, n - 1)
  image_at = jnp.take_along_axis(image_embeds, image_slot[..., None], axis=1)
  flat_prompts = prompt_embeds.reshape(b, -1, h)
  prompt_at = jnp.take_along_axis(
      flat_prompts, jnp.clip(vp_token_index, 0, flat_prompts.shape[1] - 1)[..., None], axis=1)
  x = jnp.where(is_image[..., None], image_at.astype(text_embeds.dtype), text_embeds)
  return jnp.where((vp_token_index >= 0)[..., None], prompt_at.astype(text_embeds.dtype), x)


def image_token_cells(view_affine: jax.Array, image_size: int, grid: int) -> jax.Array:
  """Where each image token sits: [B, V, 2, 3] view affines -> cells [B, V*G*G, 4].

  Token (i, j) of view v covers cell (i, j) of the view's G x G grid. The cell's corners are
  mapped back to the original image (inverse of view v's affine), then into the global view
  (view 0's affine), and divided by `image_size`: (x1, y1, x2, y2) in the frame of batch.py's
  `prompt_geometry`. Zoom tiles give smaller cells than the global view.
  """
  edges = jnp.arange(grid + 1, dtype=jnp.float32) * (image_size / grid)
  x1, y1 = jnp.meshgrid(edges[:-1], edges[:-1], indexing="xy")
  x2, y2 = jnp.meshgrid(edges[1:], edges[1:], indexing="xy")
  corners = jnp.stack([jnp.stack([x1, y1], -1), jnp.stack([x2, y2], -1)], -2)
  corners = corners.reshape(1, 1, grid * grid * 2, 2)  # x fastest, then y; (top-left, bottom-right)
  linear, shift = view_affine[..., :2].astype(jnp.float32), view_affine[..., 2]
  original = jnp.einsum("bvij,bvnj->bvni", jnp.linalg.inv(linear), corners - shift[:, :, None, :])
  to_global = view_affine[:, :1].astype(jnp.float32)  # [B, 1, 2, 3]: view 0's affine
  in_global = (jnp.einsum("bvij,bvnj->bvni", to_global[..., :2], original)
               + to_global[:, :, None, :, 2]) / image_size
  in_global = in_global.reshape(*in_global.shape[:2], grid * grid, 2, 2)
  # min / max keep (x1, y1) <= (x2, y2) under any affine that flips an axis.
  cells = jnp.concatenate([in_global.min(-2), in_global.max(-2)], -1)
  return cells.reshape(view_affine.shape[0], -1, 4)


class EarthGPTX(nn.Module):
  config: ml_collections.ConfigDict  # the `model` section

  def setup(self):
    cfg = self.config
    self.vision = vision.MixedVisionEncoder(cfg.vision)
    self.prompt_encoder = prompts.VisualPromptEncoder(cfg.prompt)
    regions.check_sources(cfg.prompt.region, len(cfg.vision.convnext.dims))
    if cfg.prompt.region.sources:
      self.region_encoder = regions.RegionEncoder(cfg.prompt, cfg.llm.hidden_size)
    self.integration = integration.ContentIntegration(cfg.prompt, cfg.llm.hidden_size)
    self.llm = llama.Llama(cfg.llm)
    self.pixel = pixel.PixelDecoder(cfg.pixel)
    if cfg.box.head:
      stages = len(cfg.vision.convnext.dims)
      if not -stages <= cfg.box.feature_stage < stages:
        raise ValueError(f"model.box.feature_stage: {cfg.box.feature_stage} is not a ConvNeXt "
                         f"stage (the trunk has {stages})")
      self.box_head = box_head.BoxHead(cfg.box)

  def encode_visual(self, batch) -> VisualFeatures:
    image_tokens, dense, global_stages = self.vision(batch["pixel_values"])
    tokens_per_view = image_tokens.shape[1] // batch["view_valid"].shape[1]
    image_valid = jnp.repeat(batch["view_valid"], tokens_per_view, axis=1)
    prompt_embeds = self.prompt_encoder(batch["prompt_maps"], batch["prompt_geometry"],
                                        batch["prompt_type"], batch["prompt_valid"])
    cells = image_token_cells(batch["view_affine"], self.config.vision.image_size,
                              self.config.vision.token_grid)
    image_llm, prompt_llm = self.integration(image_tokens, cells, image_valid, prompt_embeds,
                                             batch["prompt_geometry"], batch["prompt_valid"])
    if self.config.prompt.region.sources:
      maps = [batch["pixel_values"][:, 0] if name == "pixels"
              else global_stages[int(name.removeprefix("convnext_"))]
              for name in self.config.prompt.region.sources]
      region = self.region_encoder(maps, batch["prompt_geometry"], batch["prompt_valid"])
      prompt_llm = prompt_llm + region[:, :, None, :].astype(prompt_llm.dtype)
    if self.config.box.head:
      box_features = global_stages[self.config.box.feature_stage]
    else:
      box_features = jnp.zeros((dense.shape[0], 0, 0, 0), dense.dtype)
    return VisualFeatures(image_llm, prompt_llm, dense, box_features)

  def embed_inputs(self, batch, image_llm, prompt_llm):
    """Text embeddings [B,L,H] with the visual tokens spliced in."""
    text = self.llm.embed(batch["input_ids"])
    return splice_tokens(text, batch["input_ids"], batch["vp_token_index"], image_llm,
                         prompt_llm, token_id(self.config, "image_patch"))

  def decode_masks(self, hidden_states, seg_positions_ids, pixel_values, dense):
    """Masks for every [SEG] predicted at a position where `seg_positions_ids == [SEG]`.

    hidden_states [B,T,H]; seg_positions_ids [B,T]; pixel_values [B,V,S,S,3] (the global view
    feeds a SAM image encoder) or dense [B,h,w,C] (the mixed encoders' map), per config.
    """
    states, valid = pixel.gather_seg_states(hidden_states, seg_positions_ids,
                                            token_id(self.config, "seg"), self.config.pixel.max_seg)
    size = pixel_values.shape[2]
    if self.config.pixel.image_encoder == "sam":
      mask_logits, iou = self.pixel(states, valid, sam_pixel_values=pixel_values[:, 0],
                                    out_size=size)
    else:
      mask_logits, iou = self.pixel(states, valid, dense_features=dense, out_size=size)
    return mask_logits, iou, valid

  def decode_boxes(self, hidden_states, box_positions_ids, box_features, box_targets=None,
                   box_target_valid=None):
    """Boxes [B,Qb,4], valid [B,Qb] and the head's cell logits [B,Qb,h,w] for every [BOX]
    predicted where `box_positions_ids == [BOX]`; with the box head off, zeros and all False.
    With targets (training), slots with a valid target regress at its centre cell."""
    b, qb = hidden_states.shape[0], self.config.box.max_boxes
    if not self.config.box.head:
      return (jnp.zeros((b, qb, 4), jnp.float32), jnp.zeros((b, qb), bool),
              jnp.zeros((b, qb, 1, 1), jnp.float32))
    states, valid = pixel.gather_seg_states(hidden_states, box_positions_ids,
                                            token_id(self.config, "box"), qb)
    boxes, cell_logits = self.box_head(states, valid, box_features, box_targets,
                                       box_target_valid)
    return boxes, valid, cell_logits

  def __call__(self, batch) -> EarthGPTXOutput:
    visual = self.encode_visual(batch)
    embeds = self.embed_inputs(batch, visual.image_llm, visual.prompt_llm)
    out = self.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    mask_logits, iou, valid = self.decode_masks(out.hidden_states, batch["targets"],
                                                batch["pixel_values"], visual.dense)
    boxes, box_valid, cell_logits = self.decode_boxes(out.hidden_states, batch["targets"],
                                                      visual.box_features, batch["box_targets"],
                                                      batch["box_valid"])
    return EarthGPTXOutput(out.logits, out.hidden_states, mask_logits, iou, valid, boxes,
                           box_valid, cell_logits)
