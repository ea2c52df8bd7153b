"""Losses against numpy / torch references on hand-built cases (LISA semantics)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from earthgptx_jax import losses


def _np_bce(x, y):
  p = 1.0 / (1.0 + np.exp(-x))
  return -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean(axis=(-2, -1))


def _np_dice(x, y, scale=1000.0, eps=1e-6):
  p = 1.0 / (1.0 + np.exp(-x))
  num = 2 * (p / scale * y).sum(axis=(-2, -1))
  den = (p / scale).sum(axis=(-2, -1)) + (y / scale).sum(axis=(-2, -1))
  return 1 - (num + eps) / (den + eps)


def test_perfect_mask_gives_zero_dice_and_near_zero_bce():
  y = np.zeros((1, 1, 8, 8), np.float32)
  y[0, 0, 2:5, 3:7] = 1
  logits = np.where(y > 0, 30.0, -30.0).astype(np.float32)
  out = losses.mask_losses(jnp.asarray(logits), jnp.asarray(y), jnp.ones((1, 1), bool))
  assert float(out["dice"]) == pytest.approx(0.0, abs=1e-6)
  assert float(out["bce"]) < 1e-12
  assert float(out["num_masks"]) == 1


def test_empty_vs_full_and_padding_ignored():
  # Mask 0: prediction empty (p ~ 0), target full -> Dice ~ 1, BCE ~ 20.
  # Mask 1: random case against numpy. Mask 2: padding with garbage, must not count.
  rng = np.random.default_rng(0)
  logits = np.stack([np.full((6, 6), -20.0), rng.normal(size=(6, 6)) * 3,
                     rng.normal(size=(6, 6)) * 100]).astype(np.float32)[None]
  y = np.stack([np.ones((6, 6)), rng.random((6, 6)) > 0.5,
                np.ones((6, 6))]).astype(np.float32)[None]
  valid = np.array([[True, True, False]])
  out = losses.mask_losses(jnp.asarray(logits), jnp.asarray(y), jnp.asarray(valid))
  want_bce = _np_bce(logits[0, :2].astype(np.float64), y[0, :2]).mean()
  want_dice = _np_dice(logits[0, :2].astype(np.float64), y[0, :2]).mean()
  np.testing.assert_allclose(float(out["bce"]), want_bce, rtol=1e-5)
  np.testing.assert_allclose(float(out["dice"]), want_dice, rtol=1e-5)
  empty, full = jnp.full((6, 6), -20.0), jnp.ones((6, 6))
  assert float(losses.per_mask_dice(empty, full)) == pytest.approx(1.0, abs=1e-4)  # eps only
  assert float(losses.per_mask_bce(empty, full)) == pytest.approx(20.0, rel=1e-6)
  assert float(out["num_masks"]) == 2


def test_averaged_over_valid_masks_of_whole_batch_like_lisa():
  """LISA: per-image sums weighted by mask count, then divided by the total mask count."""
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 3, 5, 5)).astype(np.float32) * 2
  y = (rng.random((2, 3, 5, 5)) > 0.4).astype(np.float32)
  valid = np.array([[True, False, False], [True, True, True]])
  out = losses.mask_losses(jnp.asarray(logits), jnp.asarray(y), jnp.asarray(valid))
  bce_t = dice_t = 0.0
  for b in range(2):
    n = int(valid[b].sum())
    x, t = torch.from_numpy(logits[b, :n]), torch.from_numpy(y[b, :n])
    per = F.binary_cross_entropy_with_logits(x, t, reduction="none").flatten(1).mean(1)
    bce_t += per.sum().item()
    dice_t += torch.from_numpy(_np_dice(logits[b, :n].astype(np.float64), y[b, :n])).sum().item()
  np.testing.assert_allclose(float(out["bce"]), bce_t / 4, rtol=1e-5)
  np.testing.assert_allclose(float(out["dice"]), dice_t / 4, rtol=1e-5)


def test_zero_valid_masks_zero_loss_and_finite_gradient():
  logits = jnp.full((2, 2, 4, 4), jnp.inf).at[0, 0].set(jnp.nan)  # garbage in padding
  y = jnp.zeros((2, 2, 4, 4))
  valid = jnp.zeros((2, 2), bool)

  def f(x):
    out = losses.mask_losses(x, y, valid)
    return out["bce"] * 2.0 + out["dice"] * 0.5

  value, grad = jax.value_and_grad(f)(logits)
  assert float(value) == 0.0
  assert np.all(np.asarray(grad) == 0.0)


def test_token_cross_entropy_matches_torch_on_answer_tokens_only():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
  targets = rng.integers(0, 11, size=(2, 5)).astype(np.int32)
  mask = np.array([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0]], bool)
  loss, count = losses.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                           jnp.asarray(mask))
  t = F.cross_entropy(torch.from_numpy(logits[mask]), torch.from_numpy(targets[mask]).long())
  np.testing.assert_allclose(float(loss), t.item(), rtol=1e-6)
  assert float(count) == 6
  # Nothing to learn -> 0, and gradient 0 rather than NaN.
  zero = jnp.zeros((2, 5), bool)
  g = jax.grad(lambda x: losses.token_cross_entropy(x, jnp.asarray(targets), zero)[0])(
      jnp.asarray(logits))
  assert float(losses.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), zero)[0]) == 0
  assert np.all(np.asarray(g) == 0)


def test_answer_cross_entropy_by_token_or_by_example():
  """"token" weighs each answer token alike (a 4-token caption counts 4 times a class name);
  "example" weighs each example alike; examples without answer tokens count in neither, and a
  batch without any gives 0 with a zero gradient."""
  loss_sum = jnp.array([4.0, 1.0, 0.0])  # a 4-token answer at mean 1, a 1-token one, nothing
  count = jnp.array([4.0, 1.0, 0.0])
  loss_sum = loss_sum.at[1].set(3.0)  # the one-word answer is worse: 3
  assert float(losses.answer_cross_entropy(loss_sum, count, "token")) == pytest.approx(7 / 5)
  assert float(losses.answer_cross_entropy(loss_sum, count, "example")) == pytest.approx(2.0)
  # "sqrt": the 4-token answer weighs 2, the one-word answer 1: (2 * 1 + 1 * 3) / 3.
  assert float(losses.answer_cross_entropy(loss_sum, count, "sqrt")) == pytest.approx(5 / 3)
  zero = jnp.zeros(3)
  g = jax.grad(lambda x: losses.answer_cross_entropy(x, zero, "example"))(loss_sum)
  assert float(losses.answer_cross_entropy(loss_sum * 0, zero, "example")) == 0.0
  assert np.all(np.asarray(g) == 0)
  g = jax.grad(lambda x: losses.answer_cross_entropy(x, zero, "sqrt"))(loss_sum)
  assert np.all(np.asarray(g) == 0)
  with pytest.raises(ValueError, match="train.answer_ce.*'tokens'"):
    losses.answer_cross_entropy(loss_sum, count, "tokens")


def test_per_task_mean_and_weighted_total():
  values = jnp.array([2.0, 4.0, 9.0, 1.0])
  counts = jnp.array([1.0, 3.0, 3.0, 0.0])
  task = jnp.array([0, 0, 2, 2])
  mean, count = losses.per_task_mean(values, counts, task, num_tasks=4)
  np.testing.assert_allclose(np.asarray(mean), [6 / 4, 0, 10 / 3, 0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(count), [4, 0, 3, 0])
  terms = dict(ce=jnp.float32(1.0), bce=jnp.float32(0.5), dice=jnp.float32(0.2))
  total = losses.weighted_total(terms, dict(ce=1.0, bce=2.0, dice=0.5))
  assert float(total) == pytest.approx(1.0 + 1.0 + 0.1)


def test_shape_mismatch_is_a_clear_error():
  with pytest.raises(ValueError, match="seg_valid"):
    losses.mask_losses(jnp.zeros((1, 2, 4, 4)), jnp.zeros((1, 2, 4, 4)), jnp.zeros((1, 3), bool))
  with pytest.raises(ValueError, match="loss_mask"):
    losses.token_cross_entropy(jnp.zeros((1, 4, 3)), jnp.zeros((1, 4), jnp.int32),
                               jnp.zeros((1, 5), bool))


def test_box_losses_match_torchvision_giou_and_detr_l1():
  from torchvision.ops import generalized_box_iou_loss
  rng = np.random.default_rng(0)
  lo = rng.uniform(0, 0.6, (2, 3, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(0.0, 0.4, (2, 3, 2))], -1).astype(np.float32)
  lo = rng.uniform(0, 0.6, (2, 3, 2))
  targets = np.concatenate([lo, lo + rng.uniform(0.05, 0.4, (2, 3, 2))], -1).astype(np.float32)
  boxes[0, 1] = targets[0, 1]  # a perfect box: gIoU 1, L1 0
  boxes[1, 0] = [0.3, 0.3, 0.3, 0.3]  # a degenerate (zero-area) prediction stays finite
  valid = np.array([[True, True, False], [True, True, True]])
  boxes[0, 2] = np.nan  # padding may hold anything
  got = losses.box_losses(jnp.asarray(boxes), jnp.asarray(targets), jnp.asarray(valid))
  b, t = torch.from_numpy(boxes[valid]), torch.from_numpy(targets[valid])
  np.testing.assert_allclose(got["giou"], generalized_box_iou_loss(b, t, reduction="mean"),
                             rtol=1e-5)
  np.testing.assert_allclose(got["l1"], (b - t).abs().sum(-1).mean(), rtol=1e-5)
  assert float(got["num_boxes"]) == 5
  np.testing.assert_allclose(losses.generalized_iou(targets[0, 1], targets[0, 1]), 1.0, rtol=1e-6)


def test_box_losses_without_valid_boxes_are_zero_with_finite_gradient():
  boxes = jnp.full((2, 2, 4), jnp.nan)
  grad = jax.grad(lambda x: sum(losses.box_losses(x, jnp.zeros((2, 2, 4)),
                                                  jnp.zeros((2, 2), bool))[k]
                                for k in ("l1", "giou")))(boxes)
  assert np.isfinite(np.asarray(grad)).all() and not np.asarray(grad).any()
  with pytest.raises(ValueError, match="box_losses"):
    losses.box_losses(jnp.zeros((2, 2, 4)), jnp.zeros((2, 3, 4)), jnp.zeros((2, 2), bool))


def test_box_cell_loss_is_cross_entropy_at_the_target_centres_cell():
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((2, 2, 4, 8)).astype(np.float32)  # h=4, w=8
  targets = np.array([[[0.1, 0.6, 0.3, 0.9], [0.0, 0.0, 0.0, 0.0]],
                      [[0.5, 0.0, 0.99, 0.2], [0.9, 0.9, 1.0, 1.0]]], np.float32)
  valid = np.array([[True, False], [True, True]])
  got = losses.box_cell_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(valid))
  # Centres (0.2, 0.75) -> row 3 col 1; (0.745, 0.1) -> row 0 col 5; (0.95, 0.95) -> row 3 col 7.
  cells = torch.tensor([3 * 8 + 1, 0 * 8 + 5, 3 * 8 + 7])
  flat = torch.from_numpy(logits).flatten(2)[torch.from_numpy(valid)]
  np.testing.assert_allclose(got, F.cross_entropy(flat, cells), rtol=1e-6)
  assert float(losses.box_cell_loss(jnp.asarray(logits), jnp.asarray(targets),
                                    jnp.zeros((2, 2), bool))) == 0.0


def test_weighted_total_needs_a_weight_per_term_and_a_term_per_weight():
  terms = dict(ce=jnp.float32(1.0), box_l1=jnp.float32(0.5))
  with pytest.raises(ValueError, match="box_l1"):
    losses.weighted_total(terms, dict(ce=1.0))
  with pytest.raises(ValueError, match="mask_dice"):
    losses.weighted_total(terms, dict(ce=1.0, box_l1=1.0, mask_dice=0.5))
