"""One attention kernel for every model (LLaMA, ViTs, SAM): `jax.nn.dot_product_attention`.

The implementation is a config value (`attention_impl`), never a code change:
  * `xla`   - the portable XLA softmax(QK^T)V; the numerical reference, runs everywhere.
  * `cudnn` - cuDNN fused flash attention (GPU only; fp16/bf16 inputs, head_dim % 8 == 0,
              head_dim <= 128).
  * `auto`  - cuDNN where it applies (GPU backend, supported dtype and head size), else XLA.
Masks use a large finite negative (as jax does), so a fully masked query row (a padding
query) yields a finite uniform average instead of NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "auto")

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def resolve_implementation(implementation: str, dtype, head_dim: int) -> str:
  """`auto` -> `cudnn` where cuDNN can run these inputs, else `xla`; validates the name."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention_impl: unknown value {implementation!r}; expected one of "
                     f"{IMPLEMENTATIONS}")
  if implementation != "auto":
    return implementation
  cudnn_ok = (jax.default_backend() == "gpu" and jnp.dtype(dtype) in map(jnp.dtype, _CUDNN_DTYPES)
              and head_dim % 8 == 0 and head_dim <= 128)
  return "cudnn" if cudnn_ok else "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          mask: jax.Array | None = None, bias: jax.Array | None = None,
                          scale: float | None = None, implementation: str = "xla") -> jax.Array:
  """Multi-head attention with grouped-query (GQA) support.

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] keys; N must be a multiple of K (K < N is grouped-query attention).
    v: [B, S, K, H] values.
    mask: optional bool, broadcastable to [B, N, T, S]; True = may attend.
    bias: optional additive logits bias, broadcastable to [B, N, T, S].
    scale: logits scale; default 1/sqrt(H).
    implementation: `xla`, `cudnn` or `auto` (see module docstring).

  Returns:
    [B, T, N, H], in q's dtype.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"attention: q, k, v must be [B, T, N, H] / [B, S, K, H]; got shapes "
                     f"{q.shape}, {k.shape}, {v.shape}")
  b, t, n, h = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != h:
    raise ValueError(f"attention: k {k.shape} and v {v.shape} must be [B={b}, S, K, H={h}]")
  if n % kv_heads:
    raise ValueError(f"attention: query heads {n} must be a multiple of key/value heads "
                     f"{kv_heads}")
  impl = resolve_implementation(implementation, q.dtype, h)
  # jax wants 4-D masks/biases with a head dimension of 1 or N.
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    mask = jnp.broadcast_to(mask, (b, mask.shape[-3] if mask.ndim >= 3 else 1, t, s))
  if bias is not None:
    bias = jnp.asarray(bias, q.dtype)
    bias = jnp.broadcast_to(bias, (b, bias.shape[-3] if bias.ndim >= 3 else 1, t, s))
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                      implementation=impl)
