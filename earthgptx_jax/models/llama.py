"""LLaMA decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) in Flax Linen.

Numerically the model of transformers' `LlamaForCausalLM` (checked by tests/test_llama.py):
the same rotate-half RoPE layout as HF checkpoints (so conversion needs no permutation), RoPE
tables in float32, RMSNorm in float32, softmax in float32.

One forward serves training, prefill and decoding. A `KVCache` holds preallocated
[B, K, S, H] keys/values per layer plus which slots hold real tokens; `decode=True` appends the
chunk at slots [end, end + T) and attends to everything valid before it, so prompts padded on
either side decode correctly (padding slots stay masked; RoPE positions count real tokens only,
as HF `generate` does).

Config: `get_config(...).model.llm` (configs/fusion.py).
"""

from __future__ import annotations

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from earthgptx_jax import losses
from earthgptx_jax.models import attention, layers

Array = jax.Array

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("nothing_saveable", "everything_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable")


def _dtype(name: str):
  return jnp.dtype(name)


def _init(config: ml_collections.ConfigDict, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), names)


def _dense_init(config: ml_collections.ConfigDict) -> dict:
  """layers.dense's dtypes and kernel init for the LLM (HF's normal(initializer_range))."""
  return dict(dtype=_dtype(config.dtype), param_dtype=_dtype(config.param_dtype),
              kernel_init=nn.initializers.normal(config.initializer_range))


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the field when the module cannot represent `config`."""
  if config.hidden_size <= 0 or config.num_layers <= 0 or config.vocab_size <= 0:
    raise ValueError(f"model.llm: hidden_size, num_layers, vocab_size must be positive; got "
                     f"{config.hidden_size}, {config.num_layers}, {config.vocab_size}")
  if config.num_heads % config.num_kv_heads:
    raise ValueError(f"model.llm.num_heads={config.num_heads} must be a multiple of "
                     f"num_kv_heads={config.num_kv_heads}")
  if config.head_dim % 2:
    raise ValueError(f"model.llm.head_dim={config.head_dim} must be even for RoPE")
  scaling = config.rope_scaling
  if scaling is not None:
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise ValueError(f"model.llm.rope_scaling.rope_type={rope_type!r} is not supported; "
                       f"expected one of {SUPPORTED_ROPE_TYPES}")
  if config.remat and config.remat_policy not in REMAT_POLICIES:
    raise ValueError(f"model.llm.remat_policy={config.remat_policy!r}; expected one of "
                     f"{REMAT_POLICIES}")
  attention.check_implementation(config.attention_impl)


def rope_inverse_frequencies(config: ml_collections.ConfigDict) -> np.ndarray:
  """[head_dim // 2] float32 inverse frequencies, as transformers computes them.

  `rope_scaling` is None or an HF dict: `linear` divides every frequency by `factor`;
  `llama3` (LLaMA-3.1) divides low frequencies by `factor` and interpolates the middle band.
  """
  dim = config.head_dim
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv_freq = (np.float32(1.0) / np.float32(config.rope_theta) ** exponents).astype(np.float32)
  scaling = config.rope_scaling
  rope_type = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
  if rope_type in (None, "default"):
    return inv_freq
  factor = np.float32(scaling["factor"])
  if rope_type == "linear":
    return (inv_freq / factor).astype(np.float32)
  # llama3
  low, high = np.float32(scaling["low_freq_factor"]), np.float32(scaling["high_freq_factor"])
  old_len = np.float32(scaling["original_max_position_embeddings"])
  low_wavelen, high_wavelen = old_len / low, old_len / high
  wavelen = np.float32(2 * np.pi) / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
  """positions [B, T] int -> (cos, sin) each [B, T, head_dim] float32, HF rotate-half layout."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x: [B, T, heads, head_dim]; cos/sin: [B, T, head_dim]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


@flax.struct.dataclass
class KVCache:
  """Preallocated keys/values for incremental decoding (static shapes, jit/while_loop safe)."""
  # Per layer [B, K, S, H], heads before slots, so a decode step's attention reads a layer
  # where it lies (no transposed copy): a tuple of one array per layer, each updated in place
  # (unscanned layers), or one [layers, B, K, S, H] array (scanned layers: the scan's xs).
  k: Array | tuple[Array, ...]
  v: Array | tuple[Array, ...]
  valid: Array  # [B, S] bool: slot holds a real (non-padding) token
  end: Array  # [] int32: slots [0, end) have been written
  next_position: Array  # [B] int32: RoPE position of the next real token (= real tokens so far)

  @property
  def max_length(self) -> int:
    return (self.k[0] if isinstance(self.k, tuple) else self.k).shape[-2]


def init_cache(config: ml_collections.ConfigDict, batch_size: int, max_length: int,
               dtype=None) -> KVCache:
  """An empty cache for `max_length` tokens (prompt + generated); dtype defaults to compute."""
  dtype = _dtype(config.dtype) if dtype is None else jnp.dtype(dtype)
  shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
  if config.scan_layers:
    k = v = jnp.zeros((config.num_layers, *shape), dtype)
  else:
    k = v = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
  return KVCache(k=k, v=v,
                 valid=jnp.zeros((batch_size, max_length), bool), end=jnp.zeros((), jnp.int32),
                 next_position=jnp.zeros((batch_size,), jnp.int32))


@flax.struct.dataclass
class LlamaOutput:
  logits: Array  # [B, L, V] float32
  hidden_states: Array  # [B, L, H] last layer after the final RMSNorm (HF hidden_states[-1])
  cache: KVCache | None


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) * weight, the statistics in float32 (as HF LlamaRMSNorm)."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: Array) -> Array:
    weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        (x.shape[-1],), _dtype(self.config.param_dtype))
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True)
                              + self.config.rms_norm_eps)
    dtype = _dtype(self.config.dtype)
    return weight.astype(dtype) * x32.astype(dtype)


class Projection(nn.Module):
  """Bias-free projection contracting the last `in_axes` input axes into `features`.

  A kernel of the full multi-axis shape (e.g. [D, N, H]) so that each axis carries its own
  logical name; flax's DenseGeneral initialises through a flattened 2-D kernel, which breaks
  multi-axis logical sharding constraints.
  """
  features: tuple[int, ...]
  names: tuple[str | None, ...]
  config: ml_collections.ConfigDict
  in_axes: int = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_shape = x.shape[x.ndim - self.in_axes:]
    kernel = self.param("kernel", _init(self.config, self.names), (*in_shape, *self.features),
                        _dtype(self.config.param_dtype))
    dtype = _dtype(self.config.dtype)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    contract = (tuple(range(x.ndim - self.in_axes, x.ndim)), tuple(range(self.in_axes)))
    return jax.lax.dot_general(x, kernel, (contract, ((), ())))


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE, optionally over a KV cache."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array, mask: Array,
               cache_kv: tuple[Array, Array] | None, end: Array | None,
               return_cache: bool = False) -> tuple[Array, tuple[Array, Array] | None]:
    """x: [B, T, D]; mask: [B, 1, T, S] with a cache, else key padding [B, 1, 1, T] (causality
    is the kernel's `is_causal` flag); cache_kv: this layer's ([B, K, S, H],) * 2 or None.

    Returns the output [B, T, D] and, with a cache, the chunk's (k, v) [B, T, K, H], or with
    `return_cache` the layer's updated cache (written in place).
    """
    cfg = self.config
    q = Projection((cfg.num_heads, cfg.head_dim), ("embed", "heads", "head_dim"), cfg,
                   name="q_proj")(x)
    k = Projection((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), cfg,
                   name="k_proj")(x)
    v = Projection((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), cfg,
                   name="v_proj")(x)
    q = nn.with_logical_constraint(apply_rope(q, cos, sin), ("activation_batch",
                                   "activation_length", "activation_heads", None))
    k = nn.with_logical_constraint(apply_rope(k, cos, sin), ("activation_batch",
                                   "activation_length", "activation_kv_heads", None))
    v = nn.with_logical_constraint(v, ("activation_batch", "activation_length",
                                       "activation_kv_heads", None))
    if cache_kv is None:
      new_kv = None
      out = attention.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                            implementation=cfg.attention_impl)
    else:
      zero = jnp.zeros((), jnp.int32)
      chunk = [a.transpose(0, 2, 1, 3).astype(cache_kv[0].dtype) for a in (k, v)]  # [B,K,T,H]
      keys, values = (jax.lax.dynamic_update_slice(c, a, (zero, zero, end, zero))
                      for c, a in zip(cache_kv, chunk))
      new_kv = (keys, values) if return_cache else (k, v)
      keys, values = keys.astype(q.dtype), values.astype(q.dtype)
      impl = attention.resolve_implementation(cfg.attention_impl, q.dtype, cfg.head_dim)
      if impl in ("xla", "pallas"):  # pallas covers whole sequences (T == S), not a cache
        out = attention.cached_attention(q, keys, values, mask)
      else:
        out = attention.dot_product_attention(q, keys.transpose(0, 2, 1, 3),
                                              values.transpose(0, 2, 1, 3), mask=mask,
                                              implementation=impl)
    out = Projection((cfg.hidden_size,), ("heads", "head_dim", "embed"), cfg, in_axes=2,
                     name="o_proj")(out)
    return out, new_kv


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dense = functools.partial(layers.dense, use_bias=False, **_dense_init(cfg))
    gate = dense(cfg.intermediate_size, ("embed", "mlp"), name="gate_proj")(x)
    up = dense(cfg.intermediate_size, ("embed", "mlp"), name="up_proj")(x)
    h = nn.with_logical_constraint(nn.silu(gate) * up, ("activation_batch", "activation_length",
                                                        "activation_mlp"))
    return dense(cfg.hidden_size, ("mlp", "embed"), name="down_proj")(h)


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)); x + mlp(norm(x)). Scan-compatible signature.

  `return_cache` (unscanned layers): return the layer's updated cache, not the chunk's k, v.
  """
  config: ml_collections.ConfigDict
  return_cache: bool = False

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array, mask: Array, end: Array | None,
               cache_k: Array | None, cache_v: Array | None):
    """x: [B, T, D] -> (x [B, T, D], chunk (k, v) [B, T, K, H] or None)."""
    cache_kv = None if cache_k is None else (cache_k, cache_v)
    h, new_kv = Attention(self.config, name="self_attn")(
        RMSNorm(self.config, name="input_layernorm")(x), cos, sin, mask, cache_kv, end,
        self.return_cache)
    x = x + h
    x = x + MLP(self.config, name="mlp")(RMSNorm(self.config, name="post_attention_layernorm")(x))
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    return x, new_kv


class Llama(nn.Module):
  """LLaMA causal LM. Params: embed_tokens, layers_{i} (or stacked `layers`), norm, lm_head."""
  config: ml_collections.ConfigDict

  def setup(self):
    cfg = self.config
    check_config(cfg)
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=_dtype(cfg.dtype),
        param_dtype=_dtype(cfg.param_dtype),
        embedding_init=_init(cfg, ("vocab", "embed")))
    block = DecoderLayer
    if cfg.remat:
      block = nn.remat(block, prevent_cse=not cfg.scan_layers,
                       policy=getattr(jax.checkpoint_policies, cfg.remat_policy))
    if cfg.scan_layers:
      self.layers = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, 0),
          length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
    else:
      self.layers = [block(cfg, return_cache=True) for _ in range(cfg.num_layers)]
    self.norm = RMSNorm(cfg)
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False,
                                  **_dense_init(cfg))
    self.inv_freq = rope_inverse_frequencies(cfg)

  def embed(self, input_ids: Array) -> Array:
    """input_ids: [B, L] int -> [B, L, D] token embeddings (compute dtype)."""
    return self.embed_tokens(input_ids)

  def __call__(self, input_ids: Array | None = None, *, inputs_embeds: Array | None = None,
               attention_mask: Array | None = None, positions: Array | None = None,
               cache: KVCache | None = None, decode: bool = False,
               logits_positions: Array | None = None) -> LlamaOutput:
    """Forward over a chunk of T tokens.

    Args:
      input_ids: [B, T] int, or None when `inputs_embeds` is given.
      inputs_embeds: [B, T, D] embeddings (e.g. text with spliced image/prompt tokens).
      attention_mask: [B, T] bool, False at padding; default all True.
      positions: [B, T] int RoPE positions; default counts real tokens (padding-aware, as
        HF generate), continuing from `cache.next_position` when decoding.
      cache: KVCache; required iff `decode`. The caller sizes it (`init_cache`) so that
        `cache.end + T <= max_length`; `generate` does.
      decode: append the chunk to `cache` (prefill or step) and return the updated cache.
      logits_positions: [B, K] int, the only positions whose logits are formed (a prefill
        needs just the last prompt token's: [B, T, V] float32 logits of a long prompt cost a
        [T, D] x [D, V] matmul and T * V * 4 bytes per row); None: every position.

    Returns:
      LlamaOutput(logits [B, T, V] float32 ([B, K, V] with `logits_positions`), hidden_states
      [B, T, D], cache or None).
    """
    cfg = self.config
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("Llama: pass exactly one of input_ids and inputs_embeds")
    if decode != (cache is not None):
      raise ValueError(f"Llama: decode={decode} needs cache given iff decode; got cache="
                       f"{'None' if cache is None else 'KVCache'}")
    if inputs_embeds is None:
      if input_ids.ndim != 2:
        raise ValueError(f"Llama: input_ids must be [B, T], got shape {input_ids.shape}")
      x = self.embed(input_ids)
    else:
      if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
        raise ValueError(f"Llama: inputs_embeds must be [B, T, {cfg.hidden_size}], got "
                         f"{inputs_embeds.shape}")
      x = inputs_embeds.astype(_dtype(cfg.dtype))
    batch, length = x.shape[:2]
    if attention_mask is None:
      attention_mask = jnp.ones((batch, length), bool)
    attention_mask = jnp.asarray(attention_mask).astype(bool)
    if attention_mask.shape != (batch, length):
      raise ValueError(f"Llama: attention_mask must be [B, T] = {(batch, length)}, got "
                       f"{attention_mask.shape}")
    start_position = cache.next_position if decode else jnp.zeros((batch,), jnp.int32)
    if positions is None:
      positions = start_position[:, None] + jnp.cumsum(attention_mask, -1, dtype=jnp.int32) - 1
      positions = jnp.maximum(positions, 0)
    cos, sin = rope_tables(positions, self.inv_freq)
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))

    if decode:
      end = cache.end
      valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (jnp.int32(0), end))
      key_slot = jnp.arange(cache.max_length)[None, :]
      query_slot = end + jnp.arange(length)[:, None]
      mask = (key_slot <= query_slot)[None, None] & valid[:, None, None, :]  # [B, 1, T, S]
      cache_k, cache_v = cache.k, cache.v
    else:
      end, valid, cache_k, cache_v = None, attention_mask, None, None
      mask = attention_mask[:, None, None, :]  # [B, 1, 1, T]; causal: `is_causal` in Attention

    if cfg.scan_layers:
      x, new_kv = self.layers(x, cos, sin, mask, end, cache_k, cache_v)
    else:
      new_k, new_v = [], []
      for i, layer in enumerate(self.layers):  # each layer writes its own cache in place
        x, kv = layer(x, cos, sin, mask, end, None if cache_k is None else cache_k[i],
                      None if cache_v is None else cache_v[i])
        if decode:
          new_k.append(kv[0])
          new_v.append(kv[1])
      cache_k, cache_v = tuple(new_k), tuple(new_v)

    hidden = self.norm(x)
    head_input = hidden
    if logits_positions is not None:
      head_input = jnp.take_along_axis(hidden, logits_positions[..., None].astype(jnp.int32), 1)
    if cfg.tie_word_embeddings:
      logits = self.embed_tokens.attend(head_input)
    else:
      logits = self.lm_head(head_input)
    logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("activation_batch",
                                        "activation_length", "activation_vocab"))

    new_cache = None
    if decode:
      if cfg.scan_layers:  # the scan returns each layer's chunk [layers, B, T, K, H]
        zero = jnp.zeros((), jnp.int32)
        index = (zero, zero, zero, end, zero)
        cache_k, cache_v = (
            jax.lax.dynamic_update_slice(c, a.transpose(0, 1, 3, 2, 4).astype(c.dtype), index)
            for c, a in zip((cache.k, cache.v), new_kv))
      new_cache = KVCache(
          k=cache_k, v=cache_v,
          valid=valid, end=end + length,
          next_position=cache.next_position + jnp.sum(attention_mask, -1, dtype=jnp.int32))
    return LlamaOutput(logits=logits, hidden_states=hidden, cache=new_cache)


def output_kernel(params, config: ml_collections.ConfigDict) -> Array:
  """The [D, V] output projection of `Llama` params, in the compute dtype (tied: embedding^T)."""
  if config.tie_word_embeddings:
    kernel = params["embed_tokens"]["embedding"].T
  else:
    kernel = params["lm_head"]["kernel"]
  return kernel.astype(_dtype(config.dtype))


def token_cross_entropy(out: LlamaOutput, params, config: ml_collections.ConfigDict,
                        targets: Array, loss_mask: Array, normalization: str = "token"
                        ) -> tuple[Array, Array, Array]:
  """Next-token CE of a forward's output: (the CE averaged as `normalization` says
  (losses.answer_cross_entropy) [], loss_sum [B], count [B]); only the first is differentiable
  on the chunked path.

  With `config.ce_chunk_size` > 0 it never forms `out.logits` (losses.chunked_token_cross_entropy
  from the hidden states and the output kernel; under jit XLA then drops the unused logits);
  otherwise the plain log-softmax of `out.logits`. Both give the same values and gradients.
  """
  chunk = int(config.get("ce_chunk_size", 0) or 0)
  if chunk > 0:
    return losses.chunked_token_cross_entropy(out.hidden_states, output_kernel(params, config),
                                              targets, loss_mask, chunk, normalization)
  loss_sum, count = losses.token_cross_entropy_per_example(out.logits, targets, loss_mask)
  return losses.answer_cross_entropy(loss_sum, count, normalization), loss_sum, count
