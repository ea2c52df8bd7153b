"""One attention kernel for every model (LLaMA, ViTs, SAM): `jax.nn.dot_product_attention`.

The implementation is a config value (`attention_impl`), never a code change:
  * `xla`   - the portable XLA softmax(QK^T)V; the numerical reference, runs everywhere.
  * `cudnn` - cuDNN fused flash attention (GPU only; fp16/bf16 inputs, head_dim % 8 == 0,
              head_dim <= 128).
  * `pallas` - the Pallas flash-attention kernel (`jax.experimental.pallas.ops.gpu.attention`,
              Triton on GPU; on other backends it runs in Pallas interpret mode, which is slow
              and only meant for checking it against `xla`). Self-attention shapes only
              (T == S); masks limited to causal and key padding, expressed as segment ids.
  * `auto`  - cuDNN where it applies (GPU backend, supported dtype and head size), else XLA.
Masks use a large finite negative (as jax does), so a fully masked query row (a padding
query) yields a finite uniform average instead of NaN. Outputs at padding queries are
implementation-defined (`pallas` lets them attend the padding keys); callers ignore them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_attention

IMPLEMENTATIONS = ("xla", "cudnn", "pallas", "auto")
# Pallas kernel tiles: query/key blocks of the forward pass (the GPU kernel's default), and the
# smallest block, which also tiles the backward pass (its default dq/dkv blocks are 32).
_PALLAS_BLOCK = 128
_PALLAS_MIN_BLOCK = 32

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def check_implementation(implementation: str) -> None:
  """Raises a ValueError for an unknown name (without touching the backend: config checks run
  before JAX's runtime starts)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention_impl: unknown value {implementation!r}; expected one of "
                     f"{IMPLEMENTATIONS}")


def resolve_implementation(implementation: str, dtype, head_dim: int) -> str:
  """`auto` -> `cudnn` where cuDNN can run these inputs, else `xla`; validates the name."""
  check_implementation(implementation)
  if implementation != "auto":
    return implementation
  cudnn_ok = (jax.default_backend() == "gpu" and jnp.dtype(dtype) in map(jnp.dtype, _CUDNN_DTYPES)
              and head_dim % 8 == 0 and head_dim <= 128)
  return "cudnn" if cudnn_ok else "xla"


def _pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                      scale: float, is_causal: bool) -> jax.Array:
  """q: [B, T, N, H], k/v: [B, T, K, H], mask: None or [B|1, 1, 1, T] key padding.

  Returns [B, T, N, H].

  Pads T to a whole number of kernel blocks; padding and masked keys get segment id 0 and real
  ones 1, so real queries never attend them (the kernel's only masking besides causal).
  """
  b, t, n, h = q.shape
  if k.shape[1] != t:
    raise ValueError(f"attention_impl='pallas': self-attention only (T == S); got T={t}, "
                     f"S={k.shape[1]}")
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    if mask.ndim != 4 or mask.shape[1:3] != (1, 1):
      raise ValueError(f"attention_impl='pallas': masks must be key padding [B, 1, 1, S] (plus "
                       f"is_causal); got mask shape {mask.shape}")
    mask = jnp.broadcast_to(mask, (b, 1, 1, t))
  # The kernel wants one key/value head per query head: repeat each group's head (GQA).
  k = jnp.repeat(k, n // k.shape[2], axis=2)
  v = jnp.repeat(v, n // v.shape[2], axis=2)
  block = min(_PALLAS_BLOCK, -(-t // _PALLAS_MIN_BLOCK) * _PALLAS_MIN_BLOCK)
  padded = -(-t // block) * block
  segment = jnp.ones((b, t), jnp.int32) if mask is None else mask[:, 0, 0, :].astype(jnp.int32)
  pad = ((0, 0), (0, padded - t), (0, 0), (0, 0))
  q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
  segment = jnp.pad(segment, ((0, 0), (0, padded - t)))
  small = _PALLAS_MIN_BLOCK
  blocks = pallas_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=small,
                                       block_kv_dkv=small, block_q_dq=small, block_kv_dq=small)
  out = pallas_attention.mha(q, k, v, segment, sm_scale=scale, causal=is_causal,
                             block_sizes=blocks, interpret=jax.default_backend() != "gpu")
  return out[:, :t]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          mask: jax.Array | None = None, bias: jax.Array | None = None,
                          scale: float | None = None, is_causal: bool = False,
                          implementation: str = "xla") -> jax.Array:
  """Multi-head attention with grouped-query (GQA) support.

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] keys; N must be a multiple of K (K < N is grouped-query attention).
    v: [B, S, K, H] values.
    mask: optional bool, broadcastable to [B, N, T, S]; True = may attend.
    bias: optional additive logits bias, broadcastable to [B, N, T, S].
    scale: logits scale; default 1/sqrt(H).
    is_causal: query i also may attend only keys j <= i (combined with `mask`). Passed as a
      flag rather than folded into `mask` so that fused kernels (cuDNN, Pallas) skip the
      masked blocks instead of reading a [T, S] mask.
    implementation: `xla`, `cudnn`, `pallas` or `auto` (see module docstring).

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
  if impl == "pallas":
    if bias is not None:
      raise ValueError("attention_impl='pallas': an additive bias is not supported; use xla")
    return _pallas_attention(q, k, v, mask, h ** -0.5 if scale is None else scale, is_causal)
  # jax wants 4-D masks/biases with a head dimension of 1 or N.
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    mask = jnp.broadcast_to(mask, (b, mask.shape[-3] if mask.ndim >= 3 else 1, t, s))
  if bias is not None:
    bias = jnp.asarray(bias, q.dtype)
    bias = jnp.broadcast_to(bias, (b, bias.shape[-3] if bias.ndim >= 3 else 1, t, s))
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                      is_causal=is_causal, implementation=impl)


def cached_attention(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array
                     ) -> jax.Array:
  """The `xla` attention of a chunk of queries over a KV cache laid out [B, K, S, H].

  q: [B, T, N, H]; keys/values: [B, K, S, H] (a cache layer: heads before slots, so neither
  matmul needs a transposed copy of the cache); mask: bool [B, 1, T, S]. Returns [B, T, N, H].
  Same math as `dot_product_attention(..., implementation="xla")` (float32 logits and softmax,
  large finite negative at masked keys).
  """
  b, t, n, h = q.shape
  kv_heads = keys.shape[1]
  qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
  logits = jnp.einsum("btkgh,bksh->bkgts", qg, keys, preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(h ** -0.5)
  big_negative = jnp.float32(-0.7 * float(jnp.finfo(jnp.float32).max))
  logits = jnp.where(mask[:, :, None], logits, big_negative)
  probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
  out = jnp.einsum("bkgts,bksh->btkgh", probs, values)
  return out.reshape(b, t, n, h).astype(q.dtype)
