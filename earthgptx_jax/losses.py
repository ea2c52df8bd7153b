"""Training losses: next-token cross-entropy on answer tokens, per-[SEG] mask BCE + Dice, and
per-[BOX] L1 + generalised-IoU + centre-cell cross-entropy (the box head, models/box_head.py).

Semantics follow LISA (`model/LISA.py`): every loss is normalised by the number of items that
really exist (answer tokens, valid masks), never by padded sizes, so padding the batch to static
shapes changes no value. Each loss is safe when nothing is valid: the value is 0 and the
gradient is 0 (no NaN), because invalid items are removed with `jnp.where` before any division
and every denominator is at least 1.

The per-term functions return unweighted means so they can be logged as is; `weighted_total`
sums named terms with the weights of the same names (`config.loss`: ce, mask_bce, mask_dice,
box_l1, box_giou, box_cell; LISA's 1.0 / 2.0 / 0.5 for the first three).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from earthgptx_jax.models.box_head import centre_cells

# LISA's Dice: predicted and target masses are divided by this before summing, so the fp32
# sums of a 1024 x 1024 mask stay small; it does not change the loss beyond rounding.
DICE_SCALE = 1000.0
DICE_EPS = 1e-6
BOX_EPS = 1e-7


def answer_cross_entropy(loss_sum: jax.Array, count: jax.Array, normalization: str) -> jax.Array:
  """The answer CE of a batch from its per-example sums and token counts.

  "token": the mean over all answer tokens of the batch (LISA's); a long answer (a caption)
  weighs as many times as it has tokens. "example": the mean over examples (with any answer
  token) of each example's own mean, so a one-word answer (a class, a count, a [BOX]) weighs as
  much as a caption: in a task mixture the image-level words then do not drown the short
  answers that need the image (docs/experiments.md). "sqrt": examples weighted by the square
  root of their answer tokens, between the two.
  """
  return jnp.sum(_example_weights(count, normalization) * loss_sum)


def _example_weights(count: jax.Array, normalization: str) -> jax.Array:
  """[B] weight of each example's loss sum (of its `count` answer tokens) in the answer CE."""
  if normalization == "token":
    return jnp.full_like(count, 1.0) / jnp.maximum(count.sum(), 1.0)
  if normalization == "example":
    has = count > 0
    return (jnp.where(has, 1.0 / jnp.maximum(count, 1.0), 0.0)
            / jnp.maximum(has.sum().astype(jnp.float32), 1.0))
  if normalization == "sqrt":  # sqrt(n) * (sum / n): a 16-token caption weighs 4 short answers
    return (jnp.where(count > 0, jax.lax.rsqrt(jnp.maximum(count, 1.0)), 0.0)
            / jnp.maximum(jnp.sqrt(count).sum(), 1.0))
  raise ValueError(f"train.answer_ce: unknown value {normalization!r}; expected 'token', "
                   "'example' or 'sqrt'")


def answer_token_weights(loss_mask: jax.Array, normalization: str) -> jax.Array:
  """[B, L] weights w with sum(w * nll) == answer_cross_entropy(loss_sum, count, normalization):
  the form the chunked CE needs, which forms its gradient in the forward pass."""
  count = loss_mask.sum(axis=-1).astype(jnp.float32)
  per_example = _example_weights(count, normalization)
  return loss_mask.astype(jnp.float32) * per_example[:, None]


def token_cross_entropy_per_example(logits: jax.Array, targets: jax.Array,
                                    loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed next-token cross-entropy and token count per example.

  Args:
    logits: [B, L, V] any float dtype; the log-softmax runs in float32.
    targets: [B, L] int, the next token at every position.
    loss_mask: [B, L] bool, True on answer tokens.
  Returns:
    (loss_sum [B] float32, count [B] float32).
  """
  if logits.shape[:2] != targets.shape or targets.shape != loss_mask.shape:
    raise ValueError(f"token_cross_entropy: logits {logits.shape}, targets {targets.shape} and "
                     f"loss_mask {loss_mask.shape} must agree on [B, L]")
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  nll = jnp.where(loss_mask, nll, 0.0)
  return nll.sum(axis=-1), loss_mask.sum(axis=-1).astype(jnp.float32)


def token_cross_entropy(logits: jax.Array, targets: jax.Array,
                        loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy over all answer tokens of the batch, and their count.

  logits [B, L, V], targets [B, L], loss_mask [B, L] -> (mean loss [], count []). A batch
  without answer tokens gives loss 0.
  """
  loss_sum, count = token_cross_entropy_per_example(logits, targets, loss_mask)
  total = count.sum()
  return loss_sum.sum() / jnp.maximum(total, 1.0), total


def chunked_token_cross_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                                loss_mask: jax.Array, chunk_size: int,
                                normalization: str = "token"
                                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`token_cross_entropy` of logits = hidden @ kernel without ever holding [B, L, V] logits.

  A scan over chunks of `chunk_size` positions computes each chunk's float32 logits, their
  log-sum-exp and, in the same pass, the chunk's gradient (softmax - one-hot): the backward pass
  only scales the precomputed gradients, so the output head costs the same three matmuls as the
  plain loss and peak memory holds [B, chunk, V] instead of several [B, L, V] float32 arrays.

  Args:
    hidden: [B, L, D] final hidden states (compute dtype).
    kernel: [D, V] output projection (compute dtype).
    targets: [B, L] int; loss_mask: [B, L] bool.
    chunk_size: positions per chunk (L is padded up to a multiple).
  Returns:
    (the answer CE averaged as `normalization` says (answer_cross_entropy) [] - the one
    differentiable output, loss_sum [B], count [B]); the last two are for logging (no gradient
    flows through them), as `token_cross_entropy_per_example`.
  """
  if hidden.shape[:2] != targets.shape or targets.shape != loss_mask.shape:
    raise ValueError(f"chunked_token_cross_entropy: hidden {hidden.shape}, targets "
                     f"{targets.shape} and loss_mask {loss_mask.shape} must agree on [B, L]")
  if chunk_size <= 0:
    raise ValueError(f"chunked_token_cross_entropy: chunk_size={chunk_size} must be positive")
  count = loss_mask.sum(axis=-1).astype(jnp.float32)
  weights = answer_token_weights(loss_mask, normalization)
  mean, nll = _fused_cross_entropy(hidden, kernel, targets.astype(jnp.int32), weights,
                                   int(chunk_size))
  nll = jax.lax.stop_gradient(nll)
  return mean, jnp.where(loss_mask, nll, 0.0).sum(axis=-1), count


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
  """[B, L, ...] -> [L / chunk, B, chunk, ...], L zero-padded to a multiple of chunk."""
  b, length = x.shape[:2]
  n = -(-length // chunk)
  x = jnp.pad(x, [(0, 0), (0, n * chunk - length)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)


def _unchunk(x: jax.Array, length: int) -> jax.Array:
  n, b, chunk = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(b, n * chunk, *x.shape[3:])[:, :length]


def _fused_ce_forward(hidden, kernel, targets, weights, chunk_size):
  """(sum(weights * nll), nll [B, L]) and the gradients of the sum (dhidden, dkernel)."""
  length, vocab = hidden.shape[1], kernel.shape[1]
  chunk = min(chunk_size, length)

  def body(dkernel, xs):
    h, t, w = xs  # [B, C, D], [B, C], [B, C]
    logits = jnp.einsum("bcd,dv->bcv", h, kernel, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = lse - jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    onehot = t[..., None] == jnp.arange(vocab, dtype=t.dtype)
    dlogits = ((jnp.exp(logits - lse[..., None]) - onehot) * w[..., None]).astype(h.dtype)
    dh = jnp.einsum("bcv,dv->bcd", dlogits, kernel, preferred_element_type=jnp.float32)
    dkernel = dkernel + jnp.einsum("bcd,bcv->dv", h, dlogits, preferred_element_type=jnp.float32)
    return dkernel, (nll, dh.astype(hidden.dtype))

  xs = (_chunks(hidden, chunk), _chunks(targets, chunk), _chunks(weights, chunk))
  dkernel, (nll, dhidden) = jax.lax.scan(body, jnp.zeros(kernel.shape, jnp.float32), xs)
  nll, dhidden = _unchunk(nll, length), _unchunk(dhidden, length)
  return (jnp.sum(weights * nll), nll), (dhidden, dkernel.astype(kernel.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_cross_entropy(hidden, kernel, targets, weights, chunk_size):
  return _fused_ce_forward(hidden, kernel, targets, weights, chunk_size)[0]


def _fused_ce_fwd(hidden, kernel, targets, weights, chunk_size):
  out, grads = _fused_ce_forward(hidden, kernel, targets, weights, chunk_size)
  return out, (grads, out[1], targets)


def _fused_ce_bwd(chunk_size, residuals, cotangents):
  # The nll output is stop_gradient-ed by the only caller: its cotangent is ignored.
  del chunk_size
  (dhidden, dkernel), nll, targets = residuals
  g = cotangents[0]
  target_zero = np.zeros(targets.shape, jax.dtypes.float0)
  return ((g * dhidden).astype(dhidden.dtype), (g * dkernel).astype(dkernel.dtype), target_zero,
          g * nll)


_fused_cross_entropy.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def per_mask_bce(mask_logits: jax.Array, seg_masks: jax.Array) -> jax.Array:
  """Pixel-mean binary cross-entropy with logits: [..., S, S] x2 -> [...] float32."""
  x = mask_logits.astype(jnp.float32)
  y = seg_masks.astype(jnp.float32)
  # Stable form of -(y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))), as torch computes it.
  loss = jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))
  return loss.mean(axis=(-2, -1))


def per_mask_dice(mask_logits: jax.Array, seg_masks: jax.Array) -> jax.Array:
  """LISA's Dice loss (scale 1000, eps 1e-6): [..., S, S] x2 -> [...] float32."""
  p = jax.nn.sigmoid(mask_logits.astype(jnp.float32))
  y = seg_masks.astype(jnp.float32)
  numerator = 2.0 * (p / DICE_SCALE * y).sum(axis=(-2, -1))
  denominator = (p / DICE_SCALE).sum(axis=(-2, -1)) + (y / DICE_SCALE).sum(axis=(-2, -1))
  return 1.0 - (numerator + DICE_EPS) / (denominator + DICE_EPS)


def mask_losses(mask_logits: jax.Array, seg_masks: jax.Array,
                seg_valid: jax.Array) -> dict[str, jax.Array]:
  """BCE and Dice, each averaged over the valid masks of the whole batch.

  Args:
    mask_logits: [B, Q, S, S] predicted logits in the global-view frame.
    seg_masks: [B, Q, S, S] targets in {0, 1}.
    seg_valid: [B, Q] bool, False for padding masks.
  Returns:
    dict(bce [], dice [], num_masks []) float32; bce = dice = 0 when no mask is valid.
  """
  if mask_logits.shape != seg_masks.shape or mask_logits.shape[:2] != seg_valid.shape:
    raise ValueError(f"mask_losses: mask_logits {mask_logits.shape}, seg_masks "
                     f"{seg_masks.shape} and seg_valid {seg_valid.shape} must agree on "
                     f"[B, Q, S, S]")
  num_masks = seg_valid.sum().astype(jnp.float32)
  denominator = jnp.maximum(num_masks, 1.0)
  # Padding slots may hold anything (even inf / NaN logits): replace them before the math so
  # neither their values nor their gradients (NaN * 0 is NaN) can leak into the result.
  keep = seg_valid[:, :, None, None]
  mask_logits = jnp.where(keep, mask_logits, 0.0)
  seg_masks = jnp.where(keep, seg_masks, 0.0)
  bce = jnp.where(seg_valid, per_mask_bce(mask_logits, seg_masks), 0.0).sum() / denominator
  dice = jnp.where(seg_valid, per_mask_dice(mask_logits, seg_masks), 0.0).sum() / denominator
  return dict(bce=bce, dice=dice, num_masks=num_masks)


def generalized_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Generalised IoU of paired boxes (x1, y1, x2, y2): [..., 4] x2 -> [...] float32.

  As torchvision's `generalized_box_iou` on the diagonal; degenerate (zero-area) pairs give
  finite values because every denominator is kept >= a tiny epsilon.
  """
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
  area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
  lo, hi = jnp.maximum(a[..., :2], b[..., :2]), jnp.minimum(a[..., 2:], b[..., 2:])
  inter = jnp.prod(jnp.clip(hi - lo, 0.0), axis=-1)
  union = area_a + area_b - inter
  iou = inter / jnp.maximum(union, BOX_EPS)
  enclose = jnp.prod(jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2]),
                     axis=-1)
  return iou - (enclose - union) / jnp.maximum(enclose, BOX_EPS)


def box_losses(boxes: jax.Array, targets: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
  """DETR's box losses, each averaged over the valid boxes of the whole batch.

  Args:
    boxes: [B, Qb, 4] predicted (x1, y1, x2, y2) in [0, 1].
    targets: [B, Qb, 4] target boxes, same frame.
    valid: [B, Qb] bool.
  Returns:
    dict(l1 [] (summed over the 4 coordinates), giou [] (mean of 1 - gIoU), num_boxes []);
    0 when no box is valid.
  """
  if boxes.shape != targets.shape or boxes.shape[:2] != valid.shape or boxes.shape[-1] != 4:
    raise ValueError(f"box_losses: boxes {boxes.shape}, targets {targets.shape} and valid "
                     f"{valid.shape} must agree on [B, Qb, 4]")
  num_boxes = valid.sum().astype(jnp.float32)
  denominator = jnp.maximum(num_boxes, 1.0)
  keep = valid[..., None]
  boxes = jnp.where(keep, boxes.astype(jnp.float32), 0.0)
  targets = jnp.where(keep, targets.astype(jnp.float32), 0.0)
  l1 = jnp.where(valid, jnp.abs(boxes - targets).sum(-1), 0.0).sum() / denominator
  giou = jnp.where(valid, 1.0 - generalized_iou(boxes, targets), 0.0).sum() / denominator
  return dict(l1=l1, giou=giou, num_boxes=num_boxes)


def box_cell_loss(cell_logits: jax.Array, targets: jax.Array, valid: jax.Array) -> jax.Array:
  """Cross-entropy of the box head's cell logits against the cell that holds each target box's
  centre (`box_head.centre_cells`), averaged over the valid boxes (0 when none).

  cell_logits [B, Qb, h, w]; targets [B, Qb, 4] in [0, 1]; valid [B, Qb].
  """
  b, q, h, w = cell_logits.shape
  if targets.shape != (b, q, 4) or valid.shape != (b, q):
    raise ValueError(f"box_cell_loss: cell_logits {cell_logits.shape}, targets {targets.shape} "
                     f"and valid {valid.shape} must agree on [B, Qb]")
  logp = jax.nn.log_softmax(cell_logits.reshape(b, q, h * w).astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, centre_cells(targets, h, w)[..., None], axis=-1)[..., 0]
  return jnp.where(valid, nll, 0.0).sum() / jnp.maximum(valid.sum().astype(jnp.float32), 1.0)


def weighted_total(terms: Mapping[str, jax.Array], weights: Mapping[str, float]) -> jax.Array:
  """Sum of weights[name] * terms[name] over the terms, in their order.

  `terms` and `weights` must name the same losses: a term without a weight or a weight without
  a term is a ValueError naming them, so a new term cannot be silently left out of the total
  and a mistyped weight cannot silently weigh nothing (the names are also the metrics the train
  step logs, one per weight).
  """
  if set(terms) != set(weights):
    raise ValueError(f"loss weights: {sorted(weights)} must name exactly the loss terms "
                     f"{sorted(terms)}")
  return sum(weights[name] * term for name, term in terms.items())


def per_task_mean(values: jax.Array, counts: jax.Array, task_id: jax.Array,
                  num_tasks: int) -> tuple[jax.Array, jax.Array]:
  """Per-task breakdown of a per-example sum, for logging.

  Args:
    values: [B] summed loss per example (e.g. `token_cross_entropy_per_example(...)[0]`).
    counts: [B] how many items each example's sum covers (tokens, masks).
    task_id: [B] int, index into data_pipelines.schema.TASKS.
    num_tasks: T, len(TASKS).
  Returns:
    (mean [T], count [T]) float32; a task absent from the batch has mean 0 and count 0.
  """
  if values.shape != counts.shape or values.shape != task_id.shape or values.ndim != 1:
    raise ValueError(f"per_task_mean: values {values.shape}, counts {counts.shape} and task_id "
                     f"{task_id.shape} must all be [B]")
  onehot = jax.nn.one_hot(task_id, num_tasks, dtype=jnp.float32)  # [B, T]
  total = onehot.T @ values.astype(jnp.float32)
  count = onehot.T @ counts.astype(jnp.float32)
  return total / jnp.maximum(count, 1.0), count
