"""SAM prompt encoder and two-way-transformer mask decoder (Kirillov et al., 2023) in Flax Linen.

Numerically this is transformers' `SamPromptEncoder` / `SamMaskDecoder` (same weights, fp32 rel.
err <= 1e-5, see tests/test_sam_parity.py); parameter names follow the HF module names so that
`convert/sam.py` is a flat key map. Layouts are channels-last: image embeddings are
[B, h, w, C] where HF has [B, C, h, w]; prompts for one image come in Q groups ("point batch" in
HF) that each give their own masks, [B, Q, N, C].

Sizes come from `config.model.pixel.decoder` (a ConfigDict): hidden_size, num_layers, num_heads,
mlp_dim, attention_downsample_rate, num_multimask_outputs, iou_head_depth, iou_head_hidden_dim,
mask_input_channels, layer_norm_eps, attention_impl.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from earthgptx_jax.models.attention import dot_product_attention
from earthgptx_jax.models.layers import conv, dense, layer_norm

Dtype = Any

# SAM's final token LayerNorm and nothing else uses torch's default eps; all other norms use
# the config's layer_norm_eps (1e-6 in every released SAM).
TORCH_DEFAULT_LAYER_NORM_EPS = 1e-5

# HF pads a point prompt without a box with one "not a point" (label -1); -10 marks padding.
NOT_A_POINT_LABEL = -1
PADDING_POINT_LABEL = -10


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """[..., T, N*H] -> [..., T, N, H]."""
  return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


class Upsample2x(nn.Module):
  """ConvTranspose2d with kernel = stride = 2: every input pixel emits a 2x2 output patch.

  Written as one matmul plus depth-to-space instead of a transposed convolution: it is the
  same map (no overlap between patches), exact, and its kernel [in, 2, 2, out] converts from
  torch's [in, out, 2, 2] by a transpose. x: [B, h, w, C] -> [B, 2h, 2w, features].
  """
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0,
                                             out_axis=(1, 2, 3)),
            ("conv_in", "conv_height", "conv_width", "conv_out")),
        (c, 2, 2, self.features), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ("conv_out",)),
                      (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    b, h, w, _ = x.shape
    y = jnp.einsum("bhwc,cijo->bhiwjo", x, kernel) + bias
    return y.reshape(b, 2 * h, 2 * w, self.features)


class FeedForward(nn.Module):
  """SAM's `num_layers`-deep ReLU MLP (hypernetworks, IoU head): x [..., D] -> [..., out].

  The output width (a few masks or hypernetwork channels) is left unsharded: it is too small to
  split over any mesh axis.
  """
  hidden_dim: int
  output_dim: int
  num_layers: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.relu(dense(self.hidden_dim, ("vit_embed", "vit_mlp"), name="proj_in", **kw)(x))
    for i in range(self.num_layers - 2):
      x = nn.relu(dense(self.hidden_dim, ("vit_mlp", None), name=f"layers_{i}", **kw)(x))
    return dense(self.output_dim, ("vit_mlp", None), name="proj_out", **kw)(x)


class SamAttention(nn.Module):
  """Multi-head attention whose q/k/v live at width hidden // downsample_rate.

  query [B, Tq, C], key [B, Tk, C], value [B, Tk, C] -> [B, Tq, C].
  """
  hidden_size: int
  num_heads: int
  downsample_rate: int
  attention_impl: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
    internal = self.hidden_size // self.downsample_rate
    if internal % self.num_heads:
      raise ValueError(f"mask decoder: num_heads={self.num_heads} must divide hidden_size // "
                       f"downsample_rate = {internal}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = split_heads(dense(internal, ("vit_embed", "vit_heads"), name="q_proj", **kw)(query),
                    self.num_heads)
    k = split_heads(dense(internal, ("vit_embed", "vit_heads"), name="k_proj", **kw)(key),
                    self.num_heads)
    v = split_heads(dense(internal, ("vit_embed", "vit_heads"), name="v_proj", **kw)(value),
                    self.num_heads)
    out = dot_product_attention(q, k, v, implementation=self.attention_impl)  # [B, Tq, N, H]
    out = out.reshape(*out.shape[:-2], internal)
    return dense(self.hidden_size, ("vit_heads", "vit_embed"), name="out_proj", **kw)(out)


class MLPBlock(nn.Module):
  """lin1 -> activation -> lin2, x [..., D] -> [..., D] (ReLU in the decoder, GELU in the ViT)."""
  mlp_dim: int
  activation: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    act = {"relu": nn.relu, "gelu": lambda y: nn.gelu(y, approximate=False)}
    if self.activation not in act:
      raise ValueError(f"activation: unknown value {self.activation!r}; expected relu or gelu")
    y = act[self.activation](dense(self.mlp_dim, ("vit_embed", "vit_mlp"), name="lin1", **kw)(x))
    return dense(x.shape[-1], ("vit_mlp", "vit_embed"), name="lin2", **kw)(y)


class TwoWayAttentionBlock(nn.Module):
  """Tokens self-attend, attend to the image, pass an MLP; then the image attends to tokens.

  queries [B, T, C] (tokens), keys [B, hw, C] (image); query_pe / key_pe are added to q and k
  of every attention (not to values). Returns updated (queries, keys).
  """
  config: ml_collections.ConfigDict
  skip_first_layer_pe: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, queries, keys, query_pe, key_pe):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = lambda rate, name: SamAttention(cfg.hidden_size, cfg.num_heads, rate,
                                        cfg.attention_impl, name=name, **kw)
    norm = lambda name: layer_norm(cfg.layer_norm_eps, name=name, **kw)
    if self.skip_first_layer_pe:
      queries = attn(1, "self_attn")(queries, queries, queries)
    else:
      q = queries + query_pe
      queries = queries + attn(1, "self_attn")(q, q, queries)
    queries = norm("layer_norm1")(queries)

    rate = cfg.attention_downsample_rate
    queries = queries + attn(rate, "cross_attn_token_to_image")(queries + query_pe, keys + key_pe,
                                                                 keys)
    queries = norm("layer_norm2")(queries)
    queries = norm("layer_norm3")(
        queries + MLPBlock(cfg.mlp_dim, "relu", name="mlp", **kw)(queries))

    keys = keys + attn(rate, "cross_attn_image_to_token")(keys + key_pe, queries + query_pe,
                                                           queries)
    keys = norm("layer_norm4")(keys)
    keys = nn.with_logical_constraint(keys, ("activation_batch", "activation_length",
                                             "activation_embed"))
    return queries, keys


class TwoWayTransformer(nn.Module):
  """`num_layers` two-way blocks and a final token-to-image attention.

  tokens [B, T, C], image [B, hw, C], image_pe [B or 1, hw, C] -> (tokens, image).
  """
  config: ml_collections.ConfigDict
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, image, image_pe):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    queries, keys = tokens, image
    for i in range(cfg.num_layers):
      queries, keys = TwoWayAttentionBlock(cfg, skip_first_layer_pe=(i == 0), name=f"layers_{i}",
                                           **kw)(queries, keys, tokens, image_pe)
    attn = SamAttention(cfg.hidden_size, cfg.num_heads, cfg.attention_downsample_rate,
                        cfg.attention_impl, name="final_attn_token_to_image", **kw)
    queries = queries + attn(queries + tokens, keys + image_pe, keys)
    queries = layer_norm(TORCH_DEFAULT_LAYER_NORM_EPS, name="layer_norm_final_attn", **kw)(queries)
    return queries, keys


class PositionalEmbedding(nn.Module):
  """Random-Fourier encoding of (x, y) in [0, 1]: [..., 2] -> [..., 2 * num_pos_feats]."""
  num_pos_feats: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, coords: jax.Array) -> jax.Array:
    gaussian = self.param("positional_embedding",
                          nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, None)),
                          (2, self.num_pos_feats), self.param_dtype)
    x = (2.0 * coords.astype(gaussian.dtype) - 1.0) @ gaussian
    x = 2.0 * math.pi * x
    return jnp.concatenate([jnp.sin(x), jnp.cos(x)], axis=-1)


class MaskEmbedding(nn.Module):
  """Mask prompt -> dense embedding: [B, 4h, 4w] logits -> [B, h, w, C]."""
  config: ml_collections.ConfigDict
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, masks: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gelu = lambda y: nn.gelu(y, approximate=False)
    x = masks[..., None]
    x = conv(cfg.mask_input_channels // 4, 2, stride=2, name="conv1", **kw)(x)
    x = gelu(layer_norm(cfg.layer_norm_eps, name="layer_norm1", **kw)(x))
    x = conv(cfg.mask_input_channels, 2, stride=2, name="conv2", **kw)(x)
    x = gelu(layer_norm(cfg.layer_norm_eps, name="layer_norm2", **kw)(x))
    return conv(cfg.hidden_size, 1, name="conv3", **kw)(x)


class SamPromptEncoder(nn.Module):
  """Points, boxes and masks -> sparse [B, Q, N, C] and dense [B, h, w, C] prompt embeddings.

  Point and box coordinates are pixels of the encoder's square input (`input_image_size`),
  x then y, as in SAM. `image_positional_embedding(h, w)` is the same Fourier encoding over the
  image-embedding grid; one `shared_embedding` serves both (HF keeps two tied copies).
  """
  config: ml_collections.ConfigDict
  input_image_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    c = self.config.hidden_size
    if c % 2:
      raise ValueError(f"decoder.hidden_size: must be even (sin/cos halves), got {c}")
    self.shared_embedding = PositionalEmbedding(c // 2, param_dtype=self.param_dtype)
    self.mask_embed = MaskEmbedding(self.config, dtype=self.dtype, param_dtype=self.param_dtype)
    embed = lambda name: self.param(
        name, nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vit_embed",)), (c,),
        self.param_dtype)
    self.no_mask_embed = embed("no_mask_embed")
    self.not_a_point_embed = embed("not_a_point_embed")
    # 0 negative point, 1 positive point, 2 box top-left, 3 box bottom-right.
    self.point_embed = [embed(f"point_embed_{i}") for i in range(4)]

  def image_positional_embedding(self, height: int, width: int) -> jax.Array:
    """Encoding of the h x w embedding grid's cell centres: [h, w, C]."""
    y = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height
    x = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width
    grid = jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)
    return self.shared_embedding(grid)

  def embed_points(self, points: jax.Array, labels: jax.Array, pad: bool) -> jax.Array:
    """points [B, Q, N, 2] pixels, labels [B, Q, N] in {1, 0, -1, -10} -> [B, Q, N(+1), C]."""
    points = points.astype(jnp.float32) + 0.5  # pixel centres
    if pad:  # without a box SAM appends one "not a point"
      points = jnp.concatenate([points, jnp.zeros_like(points[..., :1, :])], axis=-2)
      labels = jnp.concatenate(
          [labels, jnp.full_like(labels[..., :1], NOT_A_POINT_LABEL)], axis=-1)
    emb = self.shared_embedding(points / self.input_image_size)
    labels = labels[..., None]
    emb = jnp.where(labels == NOT_A_POINT_LABEL, self.not_a_point_embed, emb)
    emb = jnp.where(labels == PADDING_POINT_LABEL, 0.0, emb)
    emb = emb + jnp.where(labels == 0, self.point_embed[0], 0.0)
    return emb + jnp.where(labels == 1, self.point_embed[1], 0.0)

  def embed_boxes(self, boxes: jax.Array) -> jax.Array:
    """boxes [B, Q, 4] as (x1, y1, x2, y2) pixels -> corner embeddings [B, Q, 2, C]."""
    corners = (boxes.astype(jnp.float32) + 0.5).reshape(*boxes.shape[:-1], 2, 2)
    emb = self.shared_embedding(corners / self.input_image_size)
    return emb + jnp.stack([self.point_embed[2], self.point_embed[3]])

  def embed_masks(self, masks: jax.Array) -> jax.Array:
    """masks [B, 4h, 4w] (low-resolution logits) -> [B, h, w, C]."""
    return self.mask_embed(masks)

  def no_mask_dense(self, batch: int, height: int, width: int) -> jax.Array:
    """Dense embedding when no mask is given: `no_mask_embed` at every cell, [B, h, w, C]."""
    return jnp.broadcast_to(self.no_mask_embed.astype(self.dtype),
                            (batch, height, width, self.config.hidden_size))

  def __call__(self, *, embedding_hw: tuple[int, int], points=None, labels=None, boxes=None,
               masks=None):
    """HF `SamPromptEncoder.forward`: (sparse [B, Q, N, C] or None, dense [B, h, w, C])."""
    if points is not None and labels is None:
      raise ValueError("prompt encoder: points given without labels")
    sparse, batch = None, 1
    if points is not None:
      batch = points.shape[0]
      sparse = self.embed_points(points, labels, pad=boxes is None)
    if boxes is not None:
      batch = boxes.shape[0]
      box = self.embed_boxes(boxes)
      sparse = box if sparse is None else jnp.concatenate([sparse, box], axis=-2)
    if masks is not None:
      dense_emb = self.embed_masks(masks)
    else:
      dense_emb = self.no_mask_dense(batch, *embedding_hw)
    return sparse, dense_emb


class SamMaskDecoder(nn.Module):
  """Two-way transformer over (output tokens + prompts) and the image; hypernetwork masks.

  image_embeddings [B, h, w, C], image_pe [h, w, C], sparse [B, Q, N, C], dense [B, h, w, C]
  -> (masks [B, Q, M, 4h, 4w] logits, iou [B, Q, M]); M = 1 (the single-mask token) or
  num_multimask_outputs.
  """
  config: ml_collections.ConfigDict
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image_embeddings: jax.Array, image_pe: jax.Array, sparse: jax.Array,
               dense_prompt: jax.Array, multimask_output: bool = False):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = cfg.hidden_size
    b, h, w, _ = image_embeddings.shape
    q = sparse.shape[1]
    num_mask_tokens = cfg.num_multimask_outputs + 1
    init = nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "vit_embed"))
    iou_token = self.param("iou_token", init, (1, c), self.param_dtype)
    mask_tokens = self.param("mask_tokens", init, (num_mask_tokens, c), self.param_dtype)

    out_tokens = jnp.concatenate([iou_token, mask_tokens], axis=0).astype(self.dtype)
    out_tokens = jnp.broadcast_to(out_tokens, (b, q, *out_tokens.shape))
    tokens = jnp.concatenate([out_tokens, sparse.astype(self.dtype)], axis=2)  # [B, Q, T, C]
    tokens = tokens.reshape(b * q, -1, c)

    # Every prompt group gets its own copy of the image: keys are updated per group.
    src = (image_embeddings + dense_prompt).reshape(b, 1, h * w, c)
    src = jnp.broadcast_to(src, (b, q, h * w, c)).reshape(b * q, h * w, c)
    pos = image_pe.reshape(1, h * w, c).astype(self.dtype)
    tokens, src = TwoWayTransformer(cfg, name="transformer", **kw)(tokens, src, pos)
    iou_token_out = tokens[:, 0]
    mask_tokens_out = tokens[:, 1:1 + num_mask_tokens]

    x = Upsample2x(c // 4, name="upscale_conv1", **kw)(src.reshape(b * q, h, w, c))
    x = nn.gelu(layer_norm(cfg.layer_norm_eps, name="upscale_layer_norm", **kw)(x),
                approximate=False)
    x = nn.gelu(Upsample2x(c // 8, name="upscale_conv2", **kw)(x), approximate=False)

    hyper_in = jnp.stack([
        FeedForward(c, c // 8, 3, name=f"output_hypernetworks_mlps_{i}", **kw)(
            mask_tokens_out[:, i]) for i in range(num_mask_tokens)], axis=1)  # [BQ, M+1, C/8]
    iou = FeedForward(cfg.iou_head_hidden_dim, num_mask_tokens, cfg.iou_head_depth,
                      name="iou_prediction_head", **kw)(iou_token_out)  # [BQ, M+1]
    select = slice(1, None) if multimask_output else slice(0, 1)
    # Only the selected masks are formed: the [SEG] path uses one of the M+1 tokens.
    masks = jnp.einsum("bmc,bhwc->bmhw", hyper_in[:, select], x)
    masks = masks.reshape(b, q, -1, 4 * h, 4 * w)
    return masks, iou[:, select].reshape(b, q, -1)
