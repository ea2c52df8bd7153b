"""RSVQA (LR / HR): remote-sensing VQA.

Layout (as published): `{LR,HR}_split_<split>_questions.json` ({"questions": [{"id",
"img_id", "type", "question", "answers_ids", "active"}]}), `..._answers.json` ({"answers":
[{"id", "question_id", "answer", "active"}]}) and `Images_{LR,HR}/<img_id>.tif`. Inactive
questions are skipped; the first active answer is the target.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from data_pipelines import schema
from data_pipelines.converters import ConversionError, common

SPLITS = ("train", "validation", "test")
_SPLIT_NAMES = {"train": "train", "validation": "val", "test": "test"}
SOURCE = "rsvqa"


def records(manual_dir: str, split: str) -> Iterator[schema.Record]:
  for res in ("LR", "HR"):
    prefix = os.path.join(manual_dir, f"{res}_split_{_SPLIT_NAMES[split]}")
    if os.path.exists(prefix + "_questions.json"):
      break
  else:
    raise ConversionError(f"{manual_dir}: no LR_/HR_split_{_SPLIT_NAMES[split]}_questions.json")
  questions = common.read_json(prefix + "_questions.json")["questions"]
  answers = {a["id"]: a for a in common.read_json(prefix + "_answers.json")["answers"]}
  images = {}
  for q in questions:
    if not q.get("active", True):
      continue
    answer = next((answers[i]["answer"] for i in q.get("answers_ids", [])
                   if i in answers and answers[i].get("active", True)), None)
    if answer is None:
      common.skip(SOURCE, f"question {q['id']}", "no active answer")
      continue
    img_id = q["img_id"]
    if img_id not in images:
      path = os.path.join(manual_dir, f"Images_{res}", f"{img_id}.tif")
      images[img_id] = common.read_bytes(path) if os.path.exists(path) else None
    if images[img_id] is None:
      common.skip(SOURCE, f"question {q['id']}", f"image {img_id}.tif missing")
      continue
    yield common.vqa(f"{SOURCE}-{res}-{q['id']}", images[img_id], "optical", SOURCE,
                     q["question"], str(answer))
