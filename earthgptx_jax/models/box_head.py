"""Box head: the hidden state that predicts a [BOX] token -> one box in the global view.

    [BOX] state [B, Qb, H] -> LayerNorm -> Dense -> query [B, Qb, D]
    global-view ConvNeXt map [B, h, w, C] -> LayerNorm -> Dense (+ learned cell position) -> keys
    cell logits = query . keys / sqrt(D) over the h*w cells: which cell holds the box's centre
    cell = the target box's centre cell in training (teacher forcing), the argmax otherwise
    MLP(the cell's value, query) -> centre within that cell (sigmoid) and size (sigmoid)
    box = (centre - size / 2, centre + size / 2), clipped to [0, 1]

Why a head and not digits: tiny spelled boxes out as text (`[x1,y1,x2,y2]`, one token per
digit) and box grounding stayed at Acc@0.5 0.0 even trained alone, its answers the same box for
every image (README, box grounding): reading a position out through the LLM as digit tokens is
what failed, while the encoders do localise. The query comes from the LLM, as LISA's [SEG]
embedding queries SAM: the LLM decides *what* to look for, the head finds *where*.

Where, as CenterNet does it: "which cell" is a classification (cross-entropy of the cell logits
against the target centre's cell), and offset and size are regressed at that one cell, at the
target's cell during training as CenterNet regresses at the ground-truth peak. A first version
took the attention-weighted mean of the cell centres (soft-argmax) instead: its centres were
pulled toward the middle by every cell's leftover attention, and 600 steps of box grounding
alone reached held-out Acc@0.5 0.017 with it (README).

Losses (losses.box_losses, losses.box_cell_loss): L1 on the four coordinates + (1 - gIoU), as
DETR, and the cell cross-entropy. A new head's boxes start at `init_size` of the view (the fc2
bias), near the small objects of remote-sensing scenes.
Config: `get_config(...).model.box` (configs/fusion.py).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from earthgptx_jax.models import layers


def centre_cells(boxes: jax.Array, h: int, w: int) -> jax.Array:
  """[..., 4] boxes in [0, 1] -> [...] int32 index (row * w + col) of the cell of an h x w grid
  that holds each box's centre."""
  centre = (boxes[..., :2] + boxes[..., 2:]).astype(jnp.float32) / 2
  col = jnp.clip(jnp.floor(centre[..., 0] * w), 0, w - 1).astype(jnp.int32)
  row = jnp.clip(jnp.floor(centre[..., 1] * h), 0, h - 1).astype(jnp.int32)
  return row * w + col


class BoxHeadOutput(NamedTuple):
  boxes: jax.Array  # [B, Qb, 4] float32 (x1, y1, x2, y2), global view in [0, 1]; 0 if invalid
  cell_logits: jax.Array  # [B, Qb, h, w] float32: which cell holds each box's centre


class BoxHead(nn.Module):
  """(states [B, Qb, H], valid [B, Qb], features [B, h, w, C], optional target boxes
  [B, Qb, 4] and their valid [B, Qb]) -> BoxHeadOutput. Slots with a valid target regress at
  the target's centre cell (training), the others at their most likely cell."""
  config: ml_collections.ConfigDict  # model.box

  @nn.compact
  def __call__(self, states: jax.Array, valid: jax.Array, features: jax.Array,
               targets: jax.Array | None = None,
               target_valid: jax.Array | None = None) -> BoxHeadOutput:
    cfg = self.config
    b, q, _ = states.shape
    if valid.shape != (b, q):
      raise ValueError(f"box valid: expected shape {(b, q)}, got {valid.shape}")
    if features.ndim != 4 or features.shape[0] != b:
      raise ValueError(f"box features: expected [{b}, h, w, C], got {features.shape}")
    _, h, w, c = features.shape
    dtype = jnp.dtype(cfg.dtype)
    dense, layer_norm = layers.dense_from(cfg), layers.layer_norm_from(cfg)
    query = dense(cfg.dim, ("embed", "mlp"), name="query")(
        layer_norm(name="query_norm")(states.astype(dtype)))
    cells = layer_norm(name="feature_norm")(features.reshape(b, h * w, c).astype(dtype))
    position = self.param("position", nn.with_logical_partitioning(
        nn.initializers.truncated_normal(cfg.initializer_range), (None, "mlp")),
        (h * w, cfg.dim), jnp.dtype(cfg.param_dtype))
    keys = dense(cfg.dim, (None, "mlp"), name="key")(cells) + position.astype(dtype)
    values = dense(cfg.dim, (None, "mlp"), name="value")(cells)
    logits = jnp.einsum("bqd,bnd->bqn", query.astype(jnp.float32),
                        keys.astype(jnp.float32)) / jnp.sqrt(jnp.float32(cfg.dim))
    cell = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, Qb]
    if targets is not None:
      cell = jnp.where(target_valid, centre_cells(targets, h, w), cell)
    picked = jnp.take_along_axis(values, cell[..., None], axis=1)  # [B, Qb, D]
    x = jnp.concatenate([picked, query], axis=-1)
    x = nn.gelu(dense(cfg.dim, (None, "mlp"), name="fc1")(x), approximate=False)
    size_logit = math.log(cfg.init_size / (1 - cfg.init_size))
    x = dense(4, ("mlp", None), name="fc2", bias_init=lambda key, shape, dtype: jnp.array(
        [0.0, 0.0, size_logit, size_logit], dtype))(x).astype(jnp.float32)
    corner = jnp.stack([cell % w, cell // w], axis=-1).astype(jnp.float32)  # (col, row)
    centre = (corner + jax.nn.sigmoid(x[..., :2])) / jnp.array([w, h], jnp.float32)
    half = jax.nn.sigmoid(x[..., 2:]) / 2
    boxes = jnp.clip(jnp.concatenate([centre - half, centre + half], axis=-1), 0.0, 1.0)
    return BoxHeadOutput(jnp.where(valid[..., None], boxes, 0.0), logits.reshape(b, q, h, w))
