"""Jitted KV-cached generation: one prefill, then a `lax.while_loop` of single-token steps.

Everything has static shapes (cache of prompt + max_new_tokens slots), so one compilation
serves every prompt of the same padded shape; the loop exits early once every row has emitted
EOS. Prompts may be padded on the left or the right (`attention_mask`), and may be given as
`inputs_embeds` (the multimodal model prefills text with spliced image / prompt tokens).

Streaming: `on_token(step, tokens)` is called on the host with each step's [B] tokens as the
loop runs (an ordered `io_callback` inside the same jitted loop, so a streamed answer is the
very computation a batch answer is); pass the same callable each time, or it recompiles.

Hidden-state convention: `hidden_states[:, i]` is the last-layer hidden state (after the final
RMSNorm) at the position whose logits chose `tokens[:, i]`, i.e. the state that *predicts*
token i. This is what LISA feeds to the mask decoder for a [SEG] token (its `seg_token_mask`
is `input_ids[:, 1:] == SEG`, the position before [SEG]); in training it is the position p
with `targets[p] == SEG`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.experimental import io_callback

from earthgptx_jax.models import llama

Array = jax.Array


@flax.struct.dataclass
class GenerateOutput:
  tokens: Array  # [B, N] int32, pad_id after EOS
  lengths: Array  # [B] int32, generated tokens including EOS
  hidden_states: Array | None  # [B, N, D] (see module docstring), zeros after EOS


class _ById:
  """Hashable-by-identity holder so a Linen module (ConfigDict inside) can be jit-static."""

  def __init__(self, obj):
    self.obj = obj

  def __hash__(self):
    return id(self.obj)

  def __eq__(self, other):
    return isinstance(other, _ById) and other.obj is self.obj


def _select(logits: Array, rng: Array, sample: bool, temperature: Array, top_p: Array) -> Array:
  """logits [B, V] float32 -> token [B]: argmax, or nucleus sampling when `sample`.

  `sample` is static (greedy decoding never sorts the vocabulary); temperature and top_p are
  traced, so changing them does not recompile.
  """
  if not sample:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  threshold = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1,
                      keepdims=True)
  logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_id", "pad_id",
                                             "sample", "return_hidden_states", "on_token"))
def _generate(model: _ById, params: Any, input_ids: Array | None, inputs_embeds: Array | None,
              attention_mask: Array, rng: Array, temperature: Array, top_p: Array, *,
              max_new_tokens: int, eos_id: int, pad_id: int, sample: bool,
              return_hidden_states: bool, on_token: _ById | None) -> GenerateOutput:
  module = model.obj

  def emit(i, token):
    if on_token is not None:  # ordered: the host sees steps in order, each exactly once
      io_callback(on_token.obj, None, i, token, ordered=True)
  cfg = module.config
  prompt = input_ids if input_ids is not None else inputs_embeds
  batch, prompt_len = prompt.shape[:2]
  cache = llama.init_cache(cfg, batch, prompt_len + max_new_tokens)

  # The last real prompt token's output, wherever padding sits: the only logits prefill forms.
  last = prompt_len - 1 - jnp.argmax(attention_mask[:, ::-1], axis=-1)
  out = module.apply(params, input_ids, inputs_embeds=inputs_embeds,
                     attention_mask=attention_mask, cache=cache, decode=True,
                     logits_positions=last[:, None])
  rows = jnp.arange(batch)
  rng, step_rng = jax.random.split(rng)
  first = _select(out.logits[:, 0], step_rng, sample, temperature, top_p)

  tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  hidden = None
  if return_hidden_states:
    hidden = jnp.zeros((batch, max_new_tokens, cfg.hidden_size), out.hidden_states.dtype)
    hidden = hidden.at[:, 0].set(out.hidden_states[rows, last])
  done = first == eos_id
  emit(jnp.int32(0), first)

  def cond(state):
    i, _, _, done, _, _ = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, tokens, hidden, done, cache, rng = state
    step = module.apply(params, tokens[:, i - 1][:, None], cache=cache, decode=True)
    rng, step_rng = jax.random.split(rng)
    token = _select(step.logits[:, 0], step_rng, sample, temperature, top_p)
    token = jnp.where(done, pad_id, token)
    tokens = tokens.at[:, i].set(token)
    emit(i, token)
    if hidden is not None:
      h = jnp.where(done[:, None], 0, step.hidden_states[:, 0])
      hidden = hidden.at[:, i].set(h.astype(hidden.dtype))
    return i + 1, tokens, hidden, done | (token == eos_id), step.cache, rng

  state = (jnp.int32(1), tokens, hidden, done, out.cache, rng)
  _, tokens, hidden, _, _, _ = jax.lax.while_loop(cond, body, state)
  is_eos = tokens == eos_id
  lengths = jnp.where(jnp.any(is_eos, -1), jnp.argmax(is_eos, -1) + 1, max_new_tokens)
  return GenerateOutput(tokens=tokens, lengths=lengths.astype(jnp.int32), hidden_states=hidden)


def generate(model: llama.Llama, params: Any, *, input_ids: Array | None = None,
             inputs_embeds: Array | None = None, attention_mask: Array, max_new_tokens: int,
             eos_id: int, pad_id: int, rng: Array | None = None, temperature: float = 0.0,
             top_p: float = 1.0, return_hidden_states: bool = False,
             on_token: Callable[[Any, Any], None] | None = None) -> GenerateOutput:
  """Generates `max_new_tokens` after a (padded) prompt; jitted once per shape and setting.

  Args:
    model: a `Llama` (or any module with its `__call__(..., cache, decode, logits_positions)`
      contract and `.config` = model.llm).
    params: the Llama params tree, or `{"params": tree}` variables for `model.apply`.
    input_ids: [B, L] int prompt, or None when `inputs_embeds` [B, L, D] is given.
    attention_mask: [B, L] bool, False at padding (left or right).
    max_new_tokens: N, generated tokens per row (static).
    eos_id / pad_id: stop token; filler after it.
    rng: key for sampling (temperature > 0).
    temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
    top_p: nucleus mass kept when sampling (1.0 = all).
    return_hidden_states: also return [B, N, D] hidden states (see module docstring).
    on_token: called on the host as `on_token(step, tokens)` (numpy scalar, [B] int32; pad_id
      for rows already done) for every generated step, as it is generated (module docstring).

  Returns:
    GenerateOutput(tokens [B, N], lengths [B], hidden_states [B, N, D] or None).
  """
  if (input_ids is None) == (inputs_embeds is None):
    raise ValueError("generate: pass exactly one of input_ids and inputs_embeds")
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
  prompt = input_ids if input_ids is not None else inputs_embeds
  attention_mask = jnp.asarray(attention_mask).astype(bool)
  if attention_mask.shape != tuple(prompt.shape[:2]):
    raise ValueError(f"generate: attention_mask shape {attention_mask.shape} does not match "
                     f"the prompt's [B, L] = {tuple(prompt.shape[:2])}")
  if temperature > 0 and rng is None:
    raise ValueError("generate: temperature > 0 needs an rng key")
  rng = jax.random.key(0) if rng is None else rng
  variables = params if "params" in params else {"params": params}
  return _generate(_ById(model), variables, input_ids, inputs_embeds, attention_mask, rng,
                   jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
                   max_new_tokens=max_new_tokens, eos_id=int(eos_id), pad_id=int(pad_id),
                   sample=temperature > 0, return_hidden_states=return_hidden_states,
                   on_token=None if on_token is None else _ById(on_token))
