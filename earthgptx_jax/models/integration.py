"""Multi-modal content integration: image tokens and visual-prompt tokens -> LLM width.

EarthGPT-X fuses what the image shows with where the user pointed before either reaches the
LLM. One integration block, pre-norm with residuals (`x + f(LN(x))`), at width
D = config.embed_dim:

    image  [B, N, C_img] -> Dense -> (1) self-attention over image tokens ---------------+
      + Dense(Fourier(cell centre in the global view))                                  |
    prompt [B, P, K, D]  ->          (2) feed-forward over prompt tokens                  |
                                     (3) cross-attention: prompt tokens query the image <-+
                                         tokens whose cell touches the prompt's box
    [image ; prompt]                 (4) self-attention over the joint sequence (the "sum")
                                     LayerNorm -> projector MLP (LLaVA mlp2x_gelu) -> H_llm

Which side queries which, and why (step 3): the PROMPT tokens are the queries and the image
tokens the keys/values. The LLM reads the K tokens at each `<vpk>` placeholder; for "what is at
<vp1>?" those tokens must carry the content of the marked region, not only its shape, so each
prompt token should read out image features where its prompt is - the prompt-to-image direction
of SAM's two-way transformer and of Q-Former/Resampler read-outs. The reverse direction (image
queries prompts) would leave the prompt tokens shape-only, and an example with no prompt would
give every image token an all-masked attention row.

Where to read (step 3 is masked attention, as Mask2Former's decoder): a prompt token attends only
to image tokens whose cell (earthgptx.image_token_cells; zoom tiles have finer cells) touches
the prompt's bounding box (`prompt_geometry`; a point is a zero-size box), so prompt tokens
read their region's content by construction instead of having to learn where their prompt is
from position features. The cell positions still enter the image tokens (Fourier features of
the cell centres, through the prompt encoder's Gaussian, as SAM's image and prompt encodings
share one). Prompts see the whole image, and the image tokens see the prompts, in step (4),
where image and prompt tokens attend to each other jointly, so that several prompts can relate
to one another ("how is <vp1> placed relative to <vp2>?") and image tokens become prompt-aware.

Padding image tokens (padding zoom tiles) and absent prompts are masked as keys everywhere and
their outputs are zeros, so they change nothing else; prompts carry no order embedding, so
permuting the prompts of an example permutes the outputs. C_img is taken from the input.

Config: `get_config(...).model.prompt` (configs/fusion.py): embed_dim, fusion_heads,
fusion_mlp_dim, layer_norm_eps, initializer_range, dtype, param_dtype, remat, attention_impl.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from earthgptx_jax.models import layers

_TOKENS = ("activation_batch", "activation_length", "activation_embed")


def cells_under_boxes(cells: jax.Array, boxes: jax.Array) -> jax.Array:
  """cells [B, N, 4], boxes [B, P, 4] (x1, y1, x2, y2) -> [B, P, N]: cell n touches box p.

  Closed intervals, so a point (a zero-size box) touches the cells around it and, as the global
  view's cells tile the whole frame, every box inside the frame touches at least one cell."""
  c, bx = cells[:, None], boxes[:, :, None]
  return ((c[..., 0] <= bx[..., 2]) & (bx[..., 0] <= c[..., 2])
          & (c[..., 1] <= bx[..., 3]) & (bx[..., 1] <= c[..., 3]))


class Projector(nn.Module):
  """LLaVA-1.5's mlp2x_gelu: [..., D] -> Dense(H) -> GELU -> Dense(H) -> [..., H]."""
  config: ml_collections.ConfigDict
  llm_width: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = layers.dense_from(self.config)
    h = dense(self.llm_width, ("vit_embed", "mlp"), name="fc1")(x)
    h = nn.gelu(h, approximate=False)
    return dense(self.llm_width, ("mlp", "embed"), name="fc2")(h)


class ContentIntegration(nn.Module):
  """Integration block + projector (see the module docstring for the design).

  Attributes:
    config: `model.prompt`.
    llm_width: H_llm, the LLM's hidden size.
  """
  config: ml_collections.ConfigDict
  llm_width: int

  @nn.compact
  def __call__(self, image_tokens: jax.Array, image_cells: jax.Array, image_valid: jax.Array,
               prompt_embeds: jax.Array, prompt_boxes: jax.Array,
               prompt_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """image_tokens [B, N, C_img], image_cells [B, N, 4], image_valid [B, N],
    prompt_embeds [B, P, K, D], prompt_boxes [B, P, 4], prompt_valid [B, P]
    -> (image_llm [B, N, H_llm], prompt_llm [B, P, K, H_llm]).

    image_cells (earthgptx.image_token_cells) and prompt_boxes (batch.py's `prompt_geometry`)
    are (x1, y1, x2, y2) in the global view divided by its side."""
    cfg = self.config
    b, n, _ = image_tokens.shape
    _, p, k, d = prompt_embeds.shape
    if d != cfg.embed_dim:
      raise ValueError(f"prompt_embeds: last dim {d} differs from model.prompt.embed_dim="
                       f"{cfg.embed_dim}")
    if image_valid.shape != (b, n) or prompt_valid.shape != (b, p):
      raise ValueError(f"image_valid {image_valid.shape} / prompt_valid {prompt_valid.shape}: "
                       f"expected {(b, n)} / {(b, p)}")
    if image_cells.shape != (b, n, 4):
      raise ValueError(f"image_cells: expected {(b, n, 4)}, got {image_cells.shape}")
    if prompt_boxes.shape != (b, p, 4):
      raise ValueError(f"prompt_boxes: expected {(b, p, 4)}, got {prompt_boxes.shape}")
    dense, layer_norm = layers.dense_from(cfg), layers.layer_norm_from(cfg)
    attn = nn.remat(layers.Attention) if cfg.remat else layers.Attention
    ffn = nn.remat(layers.FeedForward) if cfg.remat else layers.FeedForward
    image_valid = image_valid.astype(bool)
    token_valid = jnp.repeat(prompt_valid.astype(bool), k, axis=1)  # [B, P*K]

    # Padding is zeroed on entry so that nothing in it (even NaN) reaches a valid token.
    image_tokens = jnp.where(image_valid[..., None], image_tokens, 0)
    img = dense(d, (None, "vit_embed"), name="image_in")(image_tokens)  # [B, N, D]
    centres = jnp.where(image_valid[..., None], (image_cells[..., :2] + image_cells[..., 2:]) / 2,
                        0.5)
    position = layers.fourier_features(centres, layers.fourier_gaussian(cfg))  # [B, N, 2F]
    img = img + dense(d, (None, "vit_embed"), name="image_position")(
        position.astype(img.dtype))
    img = nn.with_logical_constraint(img, _TOKENS)
    prm = prompt_embeds.reshape(b, p * k, d).astype(img.dtype)  # [B, P*K, D]
    prm = jnp.where(token_valid[..., None], prm, jnp.zeros((), prm.dtype))

    # (1) image self-attention.
    h = layer_norm(name="image_norm")(img)
    img = img + attn(cfg, cfg.fusion_heads, name="image_self_attn")(h, h, image_valid)
    # (2) prompt feed-forward.
    prm = prm + ffn(cfg, cfg.fusion_mlp_dim, name="prompt_ffn")(layer_norm(name="prompt_norm")(prm))
    # (3) cross-attention: prompt tokens query the image tokens under their prompt.
    under = jnp.repeat(cells_under_boxes(image_cells, prompt_boxes), k, axis=1)  # [B, P*K, N]
    q = layer_norm(name="cross_query_norm")(prm)
    kv = layer_norm(name="cross_context_norm")(img)
    prm = prm + attn(cfg, cfg.fusion_heads, name="cross_attn")(q, kv,
                                                                under & image_valid[:, None])
    # (4) self-attention over the joint sequence.
    x = jnp.concatenate([img, prm], axis=1)  # [B, N + P*K, D]
    x = nn.with_logical_constraint(x, _TOKENS)
    valid = jnp.concatenate([image_valid, token_valid], axis=1)
    h = layer_norm(name="joint_norm")(x)
    x = x + attn(cfg, cfg.fusion_heads, name="joint_self_attn")(h, h, valid)

    x = Projector(cfg, self.llm_width, name="projector")(layer_norm(name="final_norm")(x))
    x = jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))  # [B, N + P*K, H]
    x = nn.with_logical_constraint(x, _TOKENS)
    return x[:, :n], x[:, n:].reshape(b, p, k, self.llm_width)
