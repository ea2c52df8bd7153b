"""Optimizer: AdamW + warmup-cosine, global-norm clipping, decay and freezing masks by path.

Parameter groups are chosen by regular expressions over '/'-joined param paths (big_vision's
`schedule` idea): `train.frozen_patterns` lists the groups that receive no update (the paper
keeps the vision encoders frozen). Weight decay skips vectors (norm scales, biases).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax


def path_str(path) -> str:
  """A jax key path -> 'a/b/c'."""
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
  return "/".join(parts)


def match_paths(params, patterns: Sequence[str]):
  """Boolean pytree: True where the param path matches any regex (re.search)."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(c.search(path_str(path)) for c in compiled), params)


def trainable_mask(params, frozen_patterns: Sequence[str]):
  return jax.tree.map(lambda frozen: not frozen, match_paths(params, frozen_patterns))


def weight_decay_mask(params):
  """Decay matrices and kernels; never norm scales or biases (ndim < 2)."""
  return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  total = max(int(train_cfg.steps), 2)
  warmup = min(int(train_cfg.warmup_steps), total - 1)  # short runs keep one decay step
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=float(train_cfg.learning_rate), warmup_steps=warmup,
      decay_steps=total, end_value=float(train_cfg.learning_rate) * train_cfg.get(
          "final_lr_fraction", 0.0))


def make_optimizer(train_cfg, params) -> optax.GradientTransformation:
  """Clip -> AdamW (decay mask) on trainable params; frozen params get zero updates.

  Frozen parameters carry no Adam moments (optax.multi_transform gives them `set_to_zero`),
  so freezing the 7B-scale encoders also saves their optimizer memory.
  """
  adamw = optax.adamw(learning_rate_schedule(train_cfg), b1=train_cfg.get("adam_b1", 0.9),
                      b2=train_cfg.get("adam_b2", 0.999), eps=train_cfg.get("adam_eps", 1e-8),
                      weight_decay=float(train_cfg.weight_decay), mask=weight_decay_mask)
  trainable = optax.chain(optax.clip_by_global_norm(float(train_cfg.grad_clip_norm)), adamw)
  frozen_patterns = tuple(train_cfg.get("frozen_patterns", ()))
  if not frozen_patterns:
    return trainable
  labels = jax.tree.map(lambda t: "trainable" if t else "frozen",
                        trainable_mask(params, frozen_patterns))
  return optax.multi_transform({"trainable": trainable, "frozen": optax.set_to_zero()}, labels)
