"""LoRA on the LLM's projections, kept outside the model: W' = W + (alpha / r) * A @ B.

The adapters live in their own params subtree (`params['lora']`, keyed by the kernel's path),
so the Llama module is unchanged, the base weights can be frozen by path, and export merges
them with the same `merge` the forward pass uses. Kernels keep their Flax layout
`[*layers, *in_axes, *out_axes]` (q/k/v: [D, N, H]; o: [N, H, D]; MLP: [D, F] / [F, D]); the
adapter factorises the flattened in x out matrix.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp

from earthgptx_jax import optim

# projection name -> (number of input axes, number of output axes) of its Flax kernel.
KERNEL_LAYOUT = {"q_proj": (1, 2), "k_proj": (1, 2), "v_proj": (1, 2), "o_proj": (2, 1),
                 "gate_proj": (1, 1), "up_proj": (1, 1), "down_proj": (1, 1)}


def _target_kernels(params, lora_cfg) -> dict[str, tuple[int, ...]]:
  targets = tuple(lora_cfg.targets)
  unknown = [t for t in targets if t not in KERNEL_LAYOUT]
  if unknown:
    raise ValueError(f"train.lora.targets: unknown projection(s) {unknown}; expected names "
                     f"from {sorted(KERNEL_LAYOUT)}")
  pattern = re.compile(r"(^|/)llm/.*(" + "|".join(targets) + r")/kernel$")
  found = {}
  jax.tree_util.tree_map_with_path(
      lambda p, x: found.__setitem__(optim.path_str(p), tuple(x.shape))
      if pattern.search(optim.path_str(p)) else None, params)
  if not found:
    raise ValueError(f"train.lora.targets={targets}: no matching kernel under llm/")
  return found


def _layout(path: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
  name = path.split("/")[-2]
  n_in, n_out = KERNEL_LAYOUT[name]
  lead = shape[:len(shape) - n_in - n_out]
  d_in = math.prod(shape[len(lead):len(lead) + n_in])
  d_out = math.prod(shape[len(lead) + n_in:])
  return lead, d_in, d_out


def init(rng, params, lora_cfg) -> dict[str, dict[str, jax.Array]]:
  """A ~ N(0, 1/in) (Kaiming-like), B = 0, so the merged model starts equal to the base."""
  adapters = {}
  for n, (path, shape) in enumerate(sorted(_target_kernels(params, lora_cfg).items())):
    lead, d_in, d_out = _layout(path, shape)
    a = jax.random.normal(jax.random.fold_in(rng, n), (*lead, d_in, lora_cfg.rank)) / math.sqrt(d_in)
    adapters[path] = {"a": a.astype(jnp.float32),
                      "b": jnp.zeros((*lead, lora_cfg.rank, d_out), jnp.float32)}
  return adapters


def merge(params, adapters, lora_cfg):
  """Base params with every adapter folded into its kernel (differentiable in both)."""
  if not adapters:
    return params
  scale = float(lora_cfg.alpha) / float(lora_cfg.rank)

  def fold(path, kernel):
    key = optim.path_str(path)
    if key not in adapters:
      return kernel
    a, b = adapters[key]["a"], adapters[key]["b"]
    delta = jnp.einsum("...ir,...ro->...io", a, b) * scale
    return kernel + delta.reshape(kernel.shape).astype(kernel.dtype)

  return jax.tree_util.tree_map_with_path(fold, params)
