"""The model's batch: the one contract between data pipeline, model, training and inference.

All arrays have static shapes set by the config (B = train.batch_size or the inference batch):

  V  = 1 + model.vision.max_tiles    views: the global view, then zoom tiles (padded)
  S  = model.vision.image_size       side of every view, pixels
  P  = model.prompt.max_prompts      visual prompts per example (padded)
  M  = model.prompt.map_size         side of a rasterised prompt map, pixels
  Q  = model.pixel.max_seg           [SEG] tokens / target masks per example (padded)
  Qb = model.box.max_boxes           [BOX] tokens / target boxes per example (padded)
  L  = data.max_length               text tokens

Geometry conventions (owned by `earthgptx_jax/geometry.py`):
  * The global view is the whole image resized so its longest side is S and padded bottom /
    right to S x S (SAM's convention), so a mask in the global-view frame maps back to the
    original image exactly as SAM post-processes (crop the unpadded part, resize).
  * Tiles are crops of the original image resized to S x S; `view_affine` maps original pixel
    coordinates to view pixel coordinates.

| key              | dtype   | shape             | meaning                                                  |
|------------------|---------|-------------------|----------------------------------------------------------|
| pixel_values     | float32 | [B, V, S, S, 3]   | views after per-modality preprocessing, in [0, 1]; each  |
|                  |         |                   | encoder applies its own mean/std inside the model         |
| view_valid       | bool    | [B, V]            | False for padding tiles                                   |
| view_affine      | float32 | [B, V, 2, 3]      | original pixel (x, y, 1) -> view pixel (x, y)             |
| prompt_maps      | float32 | [B, P, M, M]      | each prompt rasterised on the global view, in {0, 1}      |
| prompt_geometry  | float32 | [B, P, 4]         | (x1, y1, x2, y2) in the global view, in [0, 1]; points    |
|                  |         |                   | are (x, y, x, y); free-form prompts give their bounds     |
| prompt_type      | int32   | [B, P]            | 0 point, 1 box, 2 free-form (polygon / scribble / mask)   |
| prompt_valid     | bool    | [B, P]            | False for padding prompts                                 |
| input_ids        | int32   | [B, L]            | tokens, placeholders expanded (see template.py)           |
| attention_mask   | bool    | [B, L]            | False at padding and at tokens of padding views           |
| targets          | int32   | [B, L]            | next token (input_ids shifted left by one)                |
| loss_mask        | bool    | [B, L]            | True where `targets` is an answer token                   |
| vp_token_index   | int32   | [B, L]            | at a <vp_patch>: p * K + j (prompt p, its j-th token),    |
|                  |         |                   | K = model.prompt.tokens_per_prompt; -1 elsewhere          |
| seg_masks        | float32 | [B, Q, S, S]      | target mask of the q-th [SEG], global-view frame          |
| seg_valid        | bool    | [B, Q]            | False for padding masks                                   |
| box_targets      | float32 | [B, Qb, 4]        | target box of the q-th [BOX]: (x1, y1, x2, y2) in the     |
|                  |         |                   | global view, in [0, 1] (as prompt_geometry)               |
| box_valid        | bool    | [B, Qb]           | False for padding boxes (always, with the box head off)   |
| image_size       | int32   | [B, 2]            | original (height, width)                                  |
| task_id          | int32   | [B]               | index into data_pipelines.schema.TASKS                    |
| modality_id      | int32   | [B]               | index into template.MODALITIES                            |
"""

from __future__ import annotations

import numpy as np


# key -> (dtype, shape as a function of (B, config)).
_SPEC = {
    "pixel_values": (np.float32, lambda b, c: (b, _views(c), c.model.vision.image_size,
                                               c.model.vision.image_size, 3)),
    "view_valid": (np.bool_, lambda b, c: (b, _views(c))),
    "view_affine": (np.float32, lambda b, c: (b, _views(c), 2, 3)),
    "prompt_maps": (np.float32, lambda b, c: (b, c.model.prompt.max_prompts,
                                              c.model.prompt.map_size, c.model.prompt.map_size)),
    "prompt_geometry": (np.float32, lambda b, c: (b, c.model.prompt.max_prompts, 4)),
    "prompt_type": (np.int32, lambda b, c: (b, c.model.prompt.max_prompts)),
    "prompt_valid": (np.bool_, lambda b, c: (b, c.model.prompt.max_prompts)),
    "input_ids": (np.int32, lambda b, c: (b, c.data.max_length)),
    "attention_mask": (np.bool_, lambda b, c: (b, c.data.max_length)),
    "targets": (np.int32, lambda b, c: (b, c.data.max_length)),
    "loss_mask": (np.bool_, lambda b, c: (b, c.data.max_length)),
    "vp_token_index": (np.int32, lambda b, c: (b, c.data.max_length)),
    "seg_masks": (np.float32, lambda b, c: (b, c.model.pixel.max_seg, c.model.vision.image_size,
                                            c.model.vision.image_size)),
    "seg_valid": (np.bool_, lambda b, c: (b, c.model.pixel.max_seg)),
    "box_targets": (np.float32, lambda b, c: (b, c.model.box.max_boxes, 4)),
    "box_valid": (np.bool_, lambda b, c: (b, c.model.box.max_boxes)),
    "image_size": (np.int32, lambda b, c: (b, 2)),
    "task_id": (np.int32, lambda b, c: (b,)),
    "modality_id": (np.int32, lambda b, c: (b,)),
}


def _views(config) -> int:
  return 1 + config.model.vision.max_tiles


def batch_shapes(config, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """(shape, dtype) of every batch field for `config` and `batch_size`."""
  return {k: (fn(batch_size, config), np.dtype(dt)) for k, (dt, fn) in _SPEC.items()}


def example_batch(config, batch_size: int) -> dict[str, np.ndarray]:
  """An all-zeros batch (identity view affines) with the right shapes, for model init and
  compile; never trained on."""
  batch = {k: np.zeros(shape, dtype) for k, (shape, dtype) in batch_shapes(config,
                                                                           batch_size).items()}
  batch["vp_token_index"][:] = -1
  batch["view_affine"][:] = np.array([[1, 0, 0], [0, 1, 0]], np.float32)  # never singular
  return batch


def validate_batch(batch: dict, config, batch_size: int) -> None:
  """Raises ValueError naming the first field whose shape or dtype breaks the contract."""
  for key, (shape, dtype) in batch_shapes(config, batch_size).items():
    if key not in batch:
      raise ValueError(f"batch: missing field {key!r}")
    value = batch[key]
    if tuple(value.shape) != shape or np.dtype(value.dtype) != dtype:
      raise ValueError(f"batch field {key!r}: expected {dtype} {shape}, "
                       f"got {np.dtype(value.dtype)} {tuple(value.shape)}")
