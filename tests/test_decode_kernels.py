"""Decoding forms only the logits it reads: prefill's last prompt position, never [B, L, V]."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from configs import fusion
from earthgptx_jax.models import decoding, llama

V, B, L = 97, 2, 11


def _model():
  cfg = fusion.get_config("tiny").model.llm
  cfg.update(dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=8))
  model = llama.Llama(cfg)
  ids = jnp.asarray(np.random.RandomState(0).randint(0, V, (B, L)))
  params = nn.unbox(model.init(jax.random.key(0), ids)["params"])
  return model, params, ids


def test_logits_positions_equal_the_full_forward_there():
  model, params, ids = _model()
  positions = jnp.asarray([[3, 10], [0, 7]])
  full = model.apply({"params": params}, ids)
  some = model.apply({"params": params}, ids, logits_positions=positions)
  np.testing.assert_allclose(some.logits, jnp.take_along_axis(full.logits, positions[..., None], 1),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(some.hidden_states, full.hidden_states)


def test_generate_prefill_never_forms_logits_of_every_prompt_position():
  model, params, ids = _model()
  mask = np.ones((B, L), bool)
  mask[0, :4] = False  # left padding: the last real position differs per row
  hlo = decoding._generate.lower(
      decoding._ById(model), {"params": params}, ids, None, jnp.asarray(mask), jax.random.key(0),
      jnp.float32(1e-6), jnp.float32(1.0), max_new_tokens=3, eos_id=-1, pad_id=0, sample=False,
      return_hidden_states=False, on_token=None).as_text()
  assert re.search(rf"\[{B},\s*1,\s*{V}\]|<{B}x1x{V}x", hlo), "prefill's last-position logits"
  assert not re.search(rf"\[{B},\s*{L},\s*{V}\]|<{B}x{L}x{V}x", hlo)
  out = decoding.generate(model, params, input_ids=ids, attention_mask=mask, max_new_tokens=3,
                          eos_id=-1, pad_id=0)
  full = model.apply({"params": params}, ids, attention_mask=mask)
  np.testing.assert_array_equal(out.tokens[:, 0], jnp.argmax(full.logits[:, -1], -1))
