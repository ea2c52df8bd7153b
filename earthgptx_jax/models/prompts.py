"""Spatial-aware visual-prompt encoder: K tokens per point / box / free-form prompt.

    prompt_maps [B, P, M, M] --(each map alone, 1 channel)--> SAE ViT --> map tokens [B*P, T, Ds]
    prompt_geometry [B, P, 4] --> SAM random-Fourier features of the two corners
                                  + per-(type, corner) embedding    --> geometry tokens [B*P, 2, Ds]
    K learned queries (+ type embedding) attend over [map tokens ; geometry tokens]
    (attention pooling, as big_vision's MAP head) + MLP --> Dense --> [B, P, K, D]

The spatial-aware encoder (SAE) is issue 3's ViT with one input channel and random init, as the
paper's randomly initialised ViT. It sees each prompt map ALONE, not stacked on the image view:
  * the image is already encoded at full strength by the pretrained mixed encoders and reaches
    the prompt tokens through the cross-attention of the integration block (integration.py), while a
    randomly initialised SAE would have to learn image features from scratch;
  * the map alone is a shape / position signal, which a small random-init ViT learns quickly;
  * an image-conditioned SAE would encode the image once per prompt (P times the cost).
Points and boxes are thin in a map (a point is one pixel), so their exact position also enters
as SAM-style random-Fourier encodings of the corners in `prompt_geometry` (a point is the
degenerate box (x, y, x, y); free-form prompts give their bounds). As in SAM
(`PositionEmbeddingRandom`), the Gaussian frequency matrix is random and not trained; here it is
drawn from `config.fourier_seed`, so it is a constant of the config, not state.

Each prompt is encoded independently and absent prompts (`prompt_valid` False) give zeros, so
padding never changes a present prompt and permuting prompts permutes their tokens.

Config: `get_config(...).model.prompt` (configs/fusion.py): max_prompts, map_size,
tokens_per_prompt, embed_dim, fourier_features, fourier_scale, fourier_seed, pool_heads,
pool_mlp_dim, sae (models/vit.py's config), layer_norm_eps, initializer_range, dtype,
param_dtype, attention_impl.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from earthgptx_jax.models import layers, vit
# export_torch reads the prompt encoder's fixed frequencies as prompts.fourier_gaussian.
from earthgptx_jax.models.layers import fourier_features, fourier_gaussian

NUM_PROMPT_TYPES = 3  # batch.py's prompt_type: 0 point, 1 box, 2 free-form
_TOKENS = ("activation_batch", "activation_length", "activation_embed")


def check_inputs(config: ml_collections.ConfigDict, prompt_maps, prompt_geometry, prompt_type,
                 prompt_valid) -> None:
  """Raises ValueError naming the field whose shape breaks batch.py's contract."""
  if prompt_maps.ndim != 4 or prompt_maps.shape[2:] != (config.map_size,) * 2:
    raise ValueError(f"prompt_maps: expected [B, P, {config.map_size}, {config.map_size}] "
                     f"(model.prompt.map_size), got {prompt_maps.shape}")
  b, p = prompt_maps.shape[:2]
  if p > config.max_prompts:
    raise ValueError(f"prompt_maps: {p} prompts per example, more than model.prompt."
                     f"max_prompts={config.max_prompts}")
  expected = {"prompt_geometry": ((b, p, 4), prompt_geometry), "prompt_type": ((b, p), prompt_type),
              "prompt_valid": ((b, p), prompt_valid)}
  for name, (shape, value) in expected.items():
    if value.shape != shape:
      raise ValueError(f"{name}: expected shape {shape}, got {value.shape}")


class VisualPromptEncoder(nn.Module):
  """(prompt_maps [B, P, M, M], prompt_geometry [B, P, 4], prompt_type [B, P],
  prompt_valid [B, P]) -> prompt_embeds [B, P, K, D] (zeros for absent prompts)."""
  config: ml_collections.ConfigDict  # model.prompt

  @nn.compact
  def __call__(self, prompt_maps: jax.Array, prompt_geometry: jax.Array, prompt_type: jax.Array,
               prompt_valid: jax.Array) -> jax.Array:
    cfg = self.config
    check_inputs(cfg, prompt_maps, prompt_geometry, prompt_type, prompt_valid)
    b, p, m, _ = prompt_maps.shape
    width = cfg.sae.hidden_size
    dtype = jnp.dtype(cfg.dtype)
    dense, layer_norm = layers.dense_from(cfg), layers.layer_norm_from(cfg)
    valid = prompt_valid.astype(bool)
    # Padding is zeroed first so that nothing in it (even NaN) reaches the outputs or gradients.
    maps = jnp.where(valid[..., None, None], prompt_maps, 0).astype(dtype)
    geometry = jnp.where(valid[..., None], prompt_geometry, 0)
    types = jnp.clip(prompt_type.astype(jnp.int32), 0, NUM_PROMPT_TYPES - 1).reshape(b * p)

    map_tokens = vit.ViT(cfg.sae, name="sae")(
        maps.reshape(b * p, m, m, 1)).last_hidden_state  # [B*P, 1 + N, Ds]

    corners = geometry.reshape(b * p, 2, 2)  # (x1, y1), (x2, y2)
    geo = fourier_features(corners, fourier_gaussian(cfg))  # [B*P, 2, 2F]
    geo = dense(width, (None, "vit_embed"), name="geometry_proj")(geo.astype(dtype))
    corner_embed = self.param(
        "corner_embed",
        nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range),
                                     (None, None, "vit_embed")),
        (NUM_PROMPT_TYPES, 2, width), jnp.dtype(cfg.param_dtype))
    geo = geo + corner_embed[types].astype(dtype)  # [B*P, 2, Ds]
    context = jnp.concatenate([map_tokens.astype(dtype), geo], axis=1)  # [B*P, T + 2, Ds]
    context = nn.with_logical_constraint(context, _TOKENS)

    init = nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range),
                                        ("tokens", "vit_embed"))
    queries = self.param("queries", init, (cfg.tokens_per_prompt, width),
                         jnp.dtype(cfg.param_dtype))
    type_embed = self.param(
        "type_embed", nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range),
                                                   (None, "vit_embed")),
        (NUM_PROMPT_TYPES, width), jnp.dtype(cfg.param_dtype))
    x = (queries[None] + type_embed[types][:, None]).astype(dtype)  # [B*P, K, Ds]
    kv = layer_norm(name="context_norm")(context)
    x = x + layers.Attention(cfg, cfg.pool_heads, name="pool")(
        layer_norm(name="query_norm")(x), kv, jnp.ones(kv.shape[:2], bool))
    x = x + layers.FeedForward(cfg, cfg.pool_mlp_dim, name="pool_ffn")(
        layer_norm(name="pool_ffn_norm")(x))
    x = dense(cfg.embed_dim, ("vit_embed", None), name="out")(layer_norm(name="out_norm")(x))
    x = x.reshape(b, p, cfg.tokens_per_prompt, cfg.embed_dim)
    return jnp.where(valid[..., None, None], x, jnp.zeros((), x.dtype))
