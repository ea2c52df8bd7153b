"""The [SEG] path: LLM hidden states at [SEG] tokens -> SAM prompts -> masks (LISA's recipe).

    hidden [B, L, H] --gather_seg_states--> seg_states [B, Q, H], seg_valid [B, Q]
    seg_states --MLP(H -> H, ReLU, -> C)--> one sparse prompt token per [SEG]        [B, Q, 1, C]
    image --SAM ViT (or the mixed encoders' dense map, projected)--> embeddings      [B, h, w, C]
    SAM mask decoder (dense prompt = no_mask_embed, single-mask output) -> [B, Q, 4h, 4w]
    bilinear resize to the global view -> mask_logits [B, Q, S, S], iou [B, Q]

Masks live in the global-view frame of batch.py (longest side resized to S, padded bottom/right),
so `postprocess_masks` maps them back to the original image exactly as SAM post-processes.
Everything has static shapes: at most `max_seg` [SEG] tokens per example, padded slots are
marked invalid and carry zero states (so no gradient flows to any other sequence position).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from earthgptx_jax.geometry import global_view_shape
from earthgptx_jax.models.layers import dense, layer_norm
from earthgptx_jax.models.mask_decoder import SamMaskDecoder, SamPromptEncoder
from earthgptx_jax.models.sam_vit import SamVisionEncoder

IMAGE_ENCODERS = ("sam", "mixed")


def gather_seg_states(hidden: jax.Array, input_ids: jax.Array, seg_token_id: int,
                      max_seg: int) -> tuple[jax.Array, jax.Array]:
  """Hidden states at the first `max_seg` [SEG] tokens of each example, in text order.

  Args:
    hidden: [B, L, H] last-layer hidden states.
    input_ids: [B, L] tokens.
    seg_token_id: id of `template.SEG` (the box head gathers its `template.BOX` states here).
    max_seg: Q, slots per example. [SEG] tokens beyond Q are dropped here; the data path
      (`validate_seg_targets`) rejects such examples before they reach the model.
  Returns:
    (states [B, Q, H], valid [B, Q]); invalid slots hold zeros.
  """
  if hidden.shape[:2] != input_ids.shape:
    raise ValueError(f"gather_seg_states: hidden {hidden.shape} and input_ids {input_ids.shape} "
                     f"must agree on [B, L]")
  is_seg = input_ids == seg_token_id
  slot = jnp.where(is_seg, jnp.cumsum(is_seg, axis=1) - 1, max_seg)  # max_seg: no slot
  onehot = jax.nn.one_hot(slot, max_seg, dtype=jnp.int32)  # [B, L, Q]
  positions = jnp.einsum("blq,l->bq", onehot, jnp.arange(input_ids.shape[1], dtype=jnp.int32))
  valid = onehot.sum(axis=1) > 0
  states = jnp.take_along_axis(hidden, positions[..., None], axis=1)
  return jnp.where(valid[..., None], states, 0).astype(hidden.dtype), valid


class PixelDecoder(nn.Module):
  """[SEG] states + image -> mask logits in the global-view frame and predicted IoU.

  config: `config.model.pixel`. With image_encoder='sam' the decoder owns a SAM ViT
  (`vision_encoder`) and takes `sam_pixel_values`, the global view [B, S, S, 3] in [0, 1] as in
  batch.py (normalised with SAM's mean/std and resized to sam_vit.image_size here). With
  'mixed' it takes `dense_features` [B, h, w, C_in], the mixed encoders' dense map of the view,
  projected to the decoder width by a 1x1 projection + LayerNorm (like SAM's neck).
  Parameter subtrees `vision_encoder`, `prompt_encoder`, `mask_decoder` load from a HF SamModel
  (`convert/sam.py`); `seg_fc1`, `seg_fc2` (and `dense_proj`, `dense_norm`) are new.
  """
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, seg_states: jax.Array, seg_valid: jax.Array, *,
               sam_pixel_values: jax.Array | None = None, dense_features: jax.Array | None = None,
               out_size: int) -> tuple[jax.Array, jax.Array]:
    """seg_states [B, Q, H], seg_valid [B, Q] -> (mask_logits [B, Q, S, S] f32, iou [B, Q] f32).

    `out_size` is S, the global view's side; padded slots (seg_valid False) get masks too,
    which the losses ignore.
    """
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    c = cfg.decoder.hidden_size
    b, q, h_llm = seg_states.shape
    if seg_valid.shape != (b, q):
      raise ValueError(f"seg_valid: expected shape {(b, q)}, got {seg_valid.shape}")

    if cfg.image_encoder == "sam":
      if sam_pixel_values is None or dense_features is not None:
        raise ValueError("PixelDecoder: image_encoder='sam' takes sam_pixel_values (the global "
                         "view) and no dense_features")
      image = sam_normalize(sam_pixel_values, cfg.sam_vit)
      embeddings = SamVisionEncoder(cfg.sam_vit, c, name="vision_encoder", **kw)(image)
    elif cfg.image_encoder == "mixed":
      if dense_features is None or sam_pixel_values is not None:
        raise ValueError("PixelDecoder: image_encoder='mixed' takes dense_features (the mixed "
                         "encoders' dense map) and no sam_pixel_values")
      x = dense(c, ("vit_embed", "vit_mlp"), name="dense_proj", **kw)(dense_features)
      embeddings = layer_norm(cfg.decoder.layer_norm_eps, name="dense_norm", **kw)(x)
    else:
      raise ValueError(f"model.pixel.image_encoder: unknown value {cfg.image_encoder!r}; "
                       f"expected one of {IMAGE_ENCODERS}")
    _, h, w, _ = embeddings.shape

    # LISA's text_hidden_fcs: Linear(H, H) -> ReLU -> Linear(H, C); one prompt token per [SEG].
    x = nn.relu(dense(h_llm, ("embed", "mlp"), name="seg_fc1", **kw)(seg_states))
    sparse = dense(c, ("mlp", "vit_embed"), name="seg_fc2", **kw)(x)[:, :, None, :]

    prompt_encoder = SamPromptEncoder(cfg.decoder, cfg.sam_vit.image_size, name="prompt_encoder",
                                      **kw)
    if self.is_initializing():
      # The [SEG] path never embeds a mask prompt; create those params anyway so that a SAM
      # checkpoint loads and exports whole (convert/sam.py).
      prompt_encoder.embed_masks(jnp.zeros((1, 4 * h, 4 * w), dtype))
    dense_prompt = prompt_encoder.no_mask_dense(b, h, w)
    image_pe = prompt_encoder.image_positional_embedding(h, w)
    masks, iou = SamMaskDecoder(cfg.decoder, name="mask_decoder", **kw)(
        embeddings, image_pe, sparse, dense_prompt, multimask_output=False)
    masks = masks[:, :, 0].astype(jnp.float32)  # [B, Q, 4h, 4w]
    masks = jax.image.resize(masks, (b, q, out_size, out_size), "bilinear", antialias=False)
    return masks, iou[:, :, 0].astype(jnp.float32)


def sam_normalize(pixel_values: jax.Array, vit_config: ml_collections.ConfigDict) -> jax.Array:
  """Global view [B, S, S, 3] in [0, 1] -> SAM ViT input [B, S', S', 3], S' = image_size.

  Resizing the padded square view keeps SAM's geometry (longest side fills the square, padding
  bottom/right). One difference from SAM's own preprocessing: SAM pads with 0 after normalising,
  the view is padded with 0 before, so padding holds -mean/std here.
  """
  if pixel_values.ndim != 4 or pixel_values.shape[-1] != 3 or (
      pixel_values.shape[1] != pixel_values.shape[2]):
    raise ValueError(f"sam_pixel_values: expected [B, S, S, 3], got {pixel_values.shape}")
  mean = jnp.asarray(vit_config.pixel_mean, jnp.float32)
  std = jnp.asarray(vit_config.pixel_std, jnp.float32)
  x = (pixel_values.astype(jnp.float32) - mean) / std
  size = vit_config.image_size
  if x.shape[1] != size:
    x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear")
  return x


# ----------------------------------------------------------------------------------------------
# Post-processing (inference) and data-path validation.


def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] float64 weights of a 1-D bilinear resize with half-pixel centres and
  no antialias (torch `interpolate(align_corners=False)`, `jax.image.resize(..., "bilinear",
  antialias=False)`): output i samples input position (i + 0.5) * in / out - 0.5, clamped to
  the edge pixels."""
  src = np.clip((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0, in_size - 1)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  weights = np.zeros((out_size, in_size))
  rows = np.arange(out_size)
  np.add.at(weights, (rows, lo), 1 - frac)
  np.add.at(weights, (rows, hi), frac)
  return weights


def postprocess_masks(mask_logits, original_hw: Sequence[int], image_size: int, *,
                      binarize: bool = False, threshold: float = 0.0) -> np.ndarray:
  """Mask logits in the global-view frame -> logits (or masks) over the original image.

  As SAM / HF `post_process_masks`: resize to the S x S padded input, crop the unpadded
  region, resize to the original (height, width); bilinear, half-pixel centres, no antialias.
  mask_logits [..., r, r] (any square resolution, e.g. S or the decoder's 4h) ->
  [..., H, W] float32, or bool when `binarize` (logit > threshold).

  On the host, in NumPy: every image has its own (H, W), and as JAX ops each new size
  compiled its own resize (two thirds of an evaluation's time). The three steps are linear
  per axis, so each axis is one [H, r] matrix product.
  """
  x = np.asarray(mask_logits, np.float32)
  if x.ndim < 2 or x.shape[-1] != x.shape[-2]:
    raise ValueError(f"mask_logits: expected [..., r, r], got {x.shape}")
  oh, ow = (int(v) for v in original_hw)
  if oh <= 0 or ow <= 0:
    raise ValueError(f"original_hw: must be positive, got {tuple(original_hw)}")
  rh, rw = global_view_shape(oh, ow, image_size)  # the image's extent inside the view
  to_view = bilinear_resize_matrix(x.shape[-1], image_size)

  def axis(cropped: int, out: int) -> np.ndarray:
    crop = to_view[:cropped]
    return crop if cropped == out else bilinear_resize_matrix(cropped, out) @ crop

  rows, cols = axis(rh, oh), axis(rw, ow)
  x = (rows @ x.astype(np.float64) @ cols.T).astype(np.float32)
  return x > threshold if binarize else x


def mask_to_box(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Tight box of a binary mask: [..., H, W] -> (box [..., 4] float32, nonempty [...] bool).

  The box is (x1, y1, x2, y2) in pixel-edge coordinates: x2 = last column + 1, so it covers
  the mask's pixels exactly and feeds `template.format_box` as is. Empty masks give zeros.
  """
  mask = jnp.asarray(mask).astype(bool)
  rows, cols = mask.any(axis=-1), mask.any(axis=-2)  # [..., H], [..., W]
  h, w = rows.shape[-1], cols.shape[-1]
  y1 = jnp.argmax(rows, axis=-1)
  y2 = h - jnp.argmax(rows[..., ::-1], axis=-1)
  x1 = jnp.argmax(cols, axis=-1)
  x2 = w - jnp.argmax(cols[..., ::-1], axis=-1)
  nonempty = rows.any(axis=-1)
  box = jnp.stack([x1, y1, x2, y2], axis=-1).astype(jnp.float32)
  return jnp.where(nonempty[..., None], box, 0.0), nonempty


def validate_seg_targets(num_seg_tokens: int, masks: np.ndarray, image_hw: Sequence[int], *,
                         max_seg: int | None = None) -> None:
  """Raises ValueError when an example's [SEG] tokens and target masks cannot be paired.

  Args:
    num_seg_tokens: [SEG] occurrences in the example's answer text.
    masks: [N, H, W] target masks in {0, 1} (bool or numeric).
    image_hw: (height, width) of the image the masks annotate.
    max_seg: model.pixel.max_seg; more [SEG] tokens than this cannot be batched.
  """
  masks = np.asarray(masks)
  if masks.ndim != 3:
    raise ValueError(f"seg masks: expected [num_masks, height, width], got shape {masks.shape}")
  if num_seg_tokens != masks.shape[0]:
    raise ValueError(f"[SEG] count: the answer has {num_seg_tokens} [SEG] token(s) but "
                     f"{masks.shape[0]} target mask(s) were given")
  if max_seg is not None and num_seg_tokens > max_seg:
    raise ValueError(f"[SEG] count: {num_seg_tokens} exceeds model.pixel.max_seg={max_seg}")
  if masks.shape[0] and tuple(masks.shape[1:]) != tuple(int(v) for v in image_hw):
    raise ValueError(f"seg masks: mask size {tuple(masks.shape[1:])} (height, width) does not "
                     f"match the image size {tuple(image_hw)}")
  if masks.size and not np.isin(masks, (0, 1)).all():
    raise ValueError(f"seg masks: values must be 0/1, got values in "
                     f"[{masks.min()}, {masks.max()}]")
