"""Optimizer: AdamW + warmup-cosine, global-norm clipping, decay and freezing masks by path.

Parameter groups are chosen by regular expressions over '/'-joined param paths (big_vision's
`schedule` idea): `train.frozen_patterns` lists the groups that receive no update (the paper
keeps the vision encoders frozen). Weight decay skips vectors (norm scales, biases).

`train.flat_optimizer` runs the same clip + AdamW on one flat vector per group (decayed /
not decayed) instead of leaf by leaf: the idea of `optax.flatten` and of PyTorch's multi-tensor
Adam. The arithmetic per element is the same; what changes is the program: ~2,000 small per-leaf
kernels for tiny's 422 leaves become a few over two vectors, and XLA:CPU compiles the update in
~11 s instead of ~25 s (most of the 11 s is the split back into leaves). The flat moments carry
no sharding (on a multi-device mesh every leaf is gathered: slower to compile, not faster), so
sharded presets keep the per-leaf optimizer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

_FROZEN, _DECAY, _NO_DECAY = "frozen", "decay", "no_decay"


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


def flat_groups(inner: optax.GradientTransformation, labels) -> optax.GradientTransformation:
  """`inner` sees {group: the group's leaves raveled and concatenated in tree order}.

  `labels` has the params' structure, each leaf a group name; leaves labelled "frozen" get
  zero updates and no state. Updates come back in each leaf's shape and dtype.
  """
  names = jax.tree.leaves(labels)
  groups = sorted(set(names) - {_FROZEN})

  def ravel(tree):
    leaves = jax.tree.leaves(tree)
    if len(leaves) != len(names):
      raise ValueError(f"flat_groups: got {len(leaves)} leaves, the labels have {len(names)}")
    return {g: jnp.concatenate([jnp.ravel(x) for x, n in zip(leaves, names) if n == g])
            for g in groups}

  def unravel(flat, like):
    leaves, treedef = jax.tree.flatten(like)
    pieces = {g: iter(jnp.split(flat[g], np.cumsum(
        [np.size(x) for x, n in zip(leaves, names) if n == g])[:-1])) for g in groups}
    return treedef.unflatten([
        jnp.zeros_like(x) if n == _FROZEN else next(pieces[n]).reshape(x.shape).astype(x.dtype)
        for x, n in zip(leaves, names)])

  def init(params):
    return inner.init(ravel(params))

  def update(updates, state, params=None):
    flat, state = inner.update(ravel(updates), state,
                               None if params is None else ravel(params))
    return unravel(flat, updates), state

  return optax.GradientTransformation(init, update)


def global_norm(train_cfg, grads) -> jax.Array:
  """optax.global_norm, over one concatenated vector when the optimizer is flat (one kernel
  instead of a reduction per leaf; the sum's order differs, the value agrees to rounding)."""
  if not train_cfg.get("flat_optimizer", False):
    return optax.global_norm(grads)
  return jnp.linalg.norm(jnp.concatenate([jnp.ravel(g) for g in jax.tree.leaves(grads)]))


def make_optimizer(train_cfg, params) -> optax.GradientTransformation:
  """Clip -> AdamW (decay mask) on trainable params; frozen params get zero updates.

  Frozen parameters carry no Adam moments (optax.multi_transform gives them `set_to_zero`),
  so freezing the 7B-scale encoders also saves their optimizer memory. The clip's global norm
  is over the trainable gradients only.
  """
  def adamw(mask):
    return optax.adamw(learning_rate_schedule(train_cfg), b1=train_cfg.get("adam_b1", 0.9),
                       b2=train_cfg.get("adam_b2", 0.999), eps=train_cfg.get("adam_eps", 1e-8),
                       weight_decay=float(train_cfg.weight_decay), mask=mask)
  clip = optax.clip_by_global_norm(float(train_cfg.grad_clip_norm))
  frozen_patterns = tuple(train_cfg.get("frozen_patterns", ()))
  if train_cfg.get("flat_optimizer", False):
    labels = jax.tree.map(
        lambda frozen, decay: _FROZEN if frozen else _DECAY if decay else _NO_DECAY,
        match_paths(params, frozen_patterns), weight_decay_mask(params))
    present = set(jax.tree.leaves(labels)) - {_FROZEN}
    return flat_groups(optax.chain(clip, adamw({g: g == _DECAY for g in present})), labels)
  trainable = optax.chain(clip, adamw(weight_decay_mask))
  if not frozen_patterns:
    return trainable
  labels = jax.tree.map(lambda t: "trainable" if t else "frozen",
                        trainable_mask(params, frozen_patterns))
  return optax.multi_transform({"trainable": trainable, "frozen": optax.set_to_zero()}, labels)
