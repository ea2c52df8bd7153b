"""Box head: the hidden state that predicts a [BOX] token -> one box in the global view.

    [BOX] state [B, Qb, H] -> LayerNorm -> Dense -> query [B, Qb, D]
    global-view ConvNeXt map [B, h, w, C] -> LayerNorm -> Dense (+ learned cell position) -> keys
    softmax(query . keys / sqrt(D)) over the h*w cells = where the query looks
    centre = attention-weighted cell centres (soft-argmax) + a learned offset of up to one cell
    size   = sigmoid(MLP(attention-pooled values, query))
    box    = (centre - size / 2, centre + size / 2), clipped to [0, 1]

Why a head and not digits: tiny spelled boxes out as text (`[x1,y1,x2,y2]`, one token per
digit) and box grounding stayed at Acc@0.5 0.0 even trained alone, its answers the same box for
every image (README, "Learning"): reading a position out through the LLM as digit tokens is
what failed, while the encoders do localise. A probe of this head on tiny's random-init
ConvNeXt, supervised directly with the named class as query, reached held-out Acc@0.5 0.50
(stage 1, 8x8 cells at 64 px) / 0.41 (stage 2) / 0.06 (stage 3) after 1000 steps of batch 32.
The soft-argmax keeps the centre inside the image and differentiable; one attention head is
enough, since one box is one place. The query comes from the LLM, as LISA's [SEG] embedding
queries SAM: the LLM decides *what* to look for, the head finds *where*.

Losses (losses.box_losses): L1 on the four coordinates + (1 - generalised IoU), as DETR.
Config: `get_config(...).model.box` (configs/fusion.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from earthgptx_jax.models.fusion import dense, layer_norm


def cell_centres(h: int, w: int) -> jax.Array:
  """[h*w, 2] (x, y) centres of a h x w grid over [0, 1], row-major (x fastest)."""
  ys, xs = jnp.meshgrid((jnp.arange(h) + 0.5) / h, (jnp.arange(w) + 0.5) / w, indexing="ij")
  return jnp.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1).astype(jnp.float32)


class BoxHead(nn.Module):
  """(states [B, Qb, H], valid [B, Qb], features [B, h, w, C]) -> boxes [B, Qb, 4] float32,
  (x1, y1, x2, y2) in the global view in [0, 1]; zeros at invalid slots."""
  config: ml_collections.ConfigDict  # model.box

  @nn.compact
  def __call__(self, states: jax.Array, valid: jax.Array, features: jax.Array) -> jax.Array:
    cfg = self.config
    b, q, _ = states.shape
    if valid.shape != (b, q):
      raise ValueError(f"box valid: expected shape {(b, q)}, got {valid.shape}")
    if features.ndim != 4 or features.shape[0] != b:
      raise ValueError(f"box features: expected [{b}, h, w, C], got {features.shape}")
    _, h, w, c = features.shape
    dtype = jnp.dtype(cfg.dtype)
    query = dense(cfg.dim, ("embed", "mlp"), cfg, name="query")(
        layer_norm(cfg, "query_norm")(states.astype(dtype)))
    cells = layer_norm(cfg, "feature_norm")(features.reshape(b, h * w, c).astype(dtype))
    position = self.param("position", nn.with_logical_partitioning(
        nn.initializers.truncated_normal(cfg.initializer_range), (None, "mlp")),
        (h * w, cfg.dim), jnp.dtype(cfg.param_dtype))
    keys = dense(cfg.dim, (None, "mlp"), cfg, name="key")(cells) + position.astype(dtype)
    values = dense(cfg.dim, (None, "mlp"), cfg, name="value")(cells)
    logits = jnp.einsum("bqd,bnd->bqn", query.astype(jnp.float32),
                        keys.astype(jnp.float32)) / jnp.sqrt(jnp.float32(cfg.dim))
    attention = jax.nn.softmax(logits, axis=-1)
    centre = attention @ cell_centres(h, w)  # [B, Qb, 2]
    pooled = jnp.einsum("bqn,bnd->bqd", attention, values.astype(jnp.float32))
    x = jnp.concatenate([pooled.astype(dtype), query], axis=-1)
    x = nn.gelu(dense(cfg.dim, (None, "mlp"), cfg, name="fc1")(x), approximate=False)
    x = dense(4, ("mlp", None), cfg, name="fc2")(x).astype(jnp.float32)
    centre = centre + jnp.tanh(x[..., :2]) / jnp.array([w, h], jnp.float32)
    half = jax.nn.sigmoid(x[..., 2:]) / 2
    boxes = jnp.clip(jnp.concatenate([centre - half, centre + half], axis=-1), 0.0, 1.0)
    return jnp.where(valid[..., None], boxes, 0.0)
