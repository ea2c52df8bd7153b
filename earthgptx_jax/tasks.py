"""The tasks EarthGPT-X is trained and evaluated on: one place to add one.

A task's position in `TASKS` is its `task_id` in the batch (batch.py), so tasks are appended,
never reordered or removed. Each names the metric families that score it (`metrics.py`), the
one metric that summarises it in the evaluation's `score` (the mean over tasks, e.g. for
keeping the best checkpoint), and the chance rule reported beside its metrics, if any.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  metrics: tuple[str, ...]  # metric families (metrics.METRIC_FAMILIES)
  headline: str  # a metric of those families: the task's term in the evaluation's `score`
  chance: str | None = None  # a chance family (metrics.METRIC_FAMILIES) reported beside them


# Segmentation counts by gIoU, as LISA reports it: mIoU averages in the background class and
# reads ~0.5 for a model that finds no object. Classification rows carry `chance`, 1 / the
# number of distinct labels among the references ("distinct_labels").
TASKS: tuple[Task, ...] = (
    Task("scene_classification", ("accuracy",), "accuracy", chance="distinct_labels"),
    Task("image_caption", ("caption",), "CIDEr"),
    Task("vqa", ("vqa",), "vqa_accuracy"),
    Task("referring_classification", ("accuracy", "semantic"), "accuracy",
         chance="distinct_labels"),
    Task("region_caption", ("caption",), "CIDEr"),
    Task("relation_reasoning", ("accuracy",), "accuracy", chance="distinct_labels"),
    Task("box_grounding", ("box",), "Acc@0.5"),
    Task("referring_segmentation", ("mask",), "gIoU"),
)

NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)  # index = task_id
BY_NAME: dict[str, Task] = {t.name: t for t in TASKS}
