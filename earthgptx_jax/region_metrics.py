"""Scores of boxes and masks against their targets, in the original image's pixels.

* boxes: answers are parsed with `template.try_parse_boxes`; an answer with no or malformed
  boxes scores IoU 0 and counts as wrong (never an exception); Acc@0.5 and mean IoU;
* masks: LISA's gIoU (mean per-mask IoU, an empty target with an empty prediction scores 1),
  cIoU (cumulative intersection / cumulative union) and mIoU (mean over background and
  foreground of the cumulative IoU: LISA's `intersectionAndUnionGPU` with K=2).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.optimize

from earthgptx_jax import answer_metrics, template

Box = tuple[float, float, float, float]  # (x1, y1, x2, y2) in pixels

def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
  """IoU of two (x1, y1, x2, y2) pixel boxes (continuous coordinates, as COCO)."""
  ax1, ay1, ax2, ay2 = (float(v) for v in a)
  bx1, by1, bx2, by2 = (float(v) for v in b)
  inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
  union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
  return inter / union if union > 0 else 0.0


def match_boxes(predicted: Sequence[Box], targets: Sequence[Box],
                threshold: float = 0.5) -> tuple[float, bool]:
  """(IoU, hit) of a set of predicted boxes against a set of target boxes.

  Boxes are matched one-to-one to maximise total IoU; IoU is the matched total divided by
  max(#predicted, #targets), so missing and extra boxes both cost. Hit means as many boxes as
  targets, each matched with IoU >= threshold. For one target and one predicted box these are
  the plain IoU and the usual Acc@threshold.
  """
  if not targets:
    raise ValueError("target_boxes: grounding needs at least one target box, got none")
  if not predicted:
    return 0.0, False
  iou = np.array([[box_iou(p, t) for t in targets] for p in predicted])  # [P, T]
  rows, cols = scipy.optimize.linear_sum_assignment(iou, maximize=True)
  matched = iou[rows, cols]
  hit = len(predicted) == len(targets) and bool(np.all(matched >= threshold))
  return float(matched.sum() / max(len(predicted), len(targets))), hit


def grounding_scores(answer: str, target_boxes: Sequence[Box],
                     image_size: tuple[int, int]) -> tuple[float, bool]:
  """(IoU, hit at 0.5) of the boxes in an answer's text; unparseable or none -> (0, False).

  image_size: (height, width) of the original image, the frame of `target_boxes`.
  """
  height, width = image_size
  boxes = template.try_parse_boxes(answer, width, height)
  return match_boxes(boxes or [], target_boxes)


# ----------------------------------------------------------------------------------------------
# Masks (LISA's gIoU / cIoU; mIoU over background and foreground).


def mask_intersection_union(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
  """[2 (background, foreground), 2 (intersection, union)] pixel counts of two binary masks.

  pred, target: [H, W], bool or {0, 1} (threshold logits first, as LISA does at 0); a missing
  prediction is an all-False mask.
  """
  pred, target = np.asarray(pred), np.asarray(target)
  if pred.shape != target.shape or pred.ndim != 2:
    raise ValueError(f"pred_mask: expected the target's [H, W] shape {target.shape}, "
                     f"got {pred.shape}")
  for name, m in (("pred_mask", pred), ("target_mask", target)):
    if m.dtype != bool and not np.isin(m, (0, 1)).all():
      raise ValueError(f"{name}: expected a binary mask (bool or 0/1), got values "
                       f"{np.unique(m)[:5]}...")
  counts = np.zeros([2, 2], np.int64)
  for cls, (p, t) in enumerate([(pred == 0, target == 0), (pred != 0, target != 0)]):
    counts[cls] = (np.count_nonzero(p & t), np.count_nonzero(p | t))
  return counts


def mask_scores_from_counts(counts: np.ndarray) -> dict[str, float]:
  """gIoU, cIoU, mIoU from per-mask counts [N, 2, 2] (see `mask_intersection_union`).

  As LISA's validation: gIoU is the mean per-mask foreground IoU where a mask pair with an
  empty union (no object, none predicted) scores 1; cIoU is sum(intersection) / sum(union) of
  the foreground; mIoU averages the cumulative IoU of background and foreground. A cumulative
  union of 0 gives 0 (LISA divides by union + 1e-10).
  """
  counts = np.asarray(counts, np.float64).reshape(-1, 2, 2)
  if counts.shape[0] == 0:
    raise ValueError("masks: mask metrics need at least one mask, got none")
  inter, union = counts[..., 0], counts[..., 1]  # [N, 2]
  per_mask = np.where(union[:, 1] > 0, inter[:, 1] / np.maximum(union[:, 1], 1), 1.0)
  total_i, total_u = inter.sum(0), union.sum(0)  # [2]
  class_iou = np.where(total_u > 0, total_i / np.maximum(total_u, 1), 0.0)
  return {"gIoU": float(per_mask.mean()), "cIoU": float(class_iou[1]),
          "mIoU": float(class_iou.mean())}


def mask_scores(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> dict[str, float]:
  """gIoU, cIoU, mIoU of binary predicted masks against target masks (pairs)."""
  answer_metrics.check_same_length(preds, targets, "target_masks")
  return mask_scores_from_counts(
      np.stack([mask_intersection_union(p, t) for p, t in zip(preds, targets)]))
