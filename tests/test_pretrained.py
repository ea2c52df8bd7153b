"""Starting a run from local pretrained weights: what is loaded lands, placed and sized."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from earthgptx_jax import batch as batch_lib
from earthgptx_jax import pretrained, trainer
from earthgptx_jax.convert import llama as convert_llama
from earthgptx_jax.convert import sam as convert_sam
from model_fixtures import tiny_config


@pytest.fixture(scope="module")
def model_and_zero_params():
  config = tiny_config()
  model = trainer.build_model(config)
  example = jax.tree.map(jnp.asarray, batch_lib.example_batch(config, 1))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), example)["params"])
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        trainer.nn.meta.unbox(shapes))
  return config, params


def _hf_llama(folder, llm, vocab):
  torch.manual_seed(0)
  hf = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
      num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads,
      num_key_value_heads=llm.num_kv_heads, head_dim=llm.head_dim,
      rms_norm_eps=llm.rms_norm_eps, tie_word_embeddings=llm.tie_word_embeddings)
  transformers.LlamaForCausalLM(hf).save_pretrained(folder)


def test_llm_and_sam_load_in_place_of_random_init(tmp_path, model_and_zero_params):
  config, params = model_and_zero_params
  config = tiny_config()
  llm_dir, sam_dir = tmp_path / "llm", tmp_path / "sam"
  base_vocab = config.model.llm.vocab_size - 7  # the project's special tokens are appended
  _hf_llama(llm_dir, config.model.llm, base_vocab)
  rng = np.random.default_rng(0)
  sam_params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                            params["pixel"])
  convert_sam.save_hf_sam(sam_params, config.model.pixel, sam_dir)
  config.model.llm.pretrained_path = str(llm_dir)
  config.model.pixel.pretrained_path = str(sam_dir)
  messages = []
  loaded = pretrained.load_into(params, config, log=messages.append)

  _, want_llm = convert_llama.load_hf_llama(llm_dir, config.model.llm)
  emb = np.asarray(loaded["llm"]["embed_tokens"]["embedding"])
  want_emb = np.asarray(want_llm["embed_tokens"]["embedding"])
  np.testing.assert_array_equal(emb[:base_vocab], want_emb)
  np.testing.assert_allclose(emb[base_vocab:], np.broadcast_to(want_emb.astype(np.float64).mean(0), (7, emb.shape[1])),
                             rtol=1e-6)
  np.testing.assert_array_equal(
      np.asarray(loaded["llm"]["layers_1"]["self_attn"]["q_proj"]["kernel"]),
      np.asarray(want_llm["layers_1"]["self_attn"]["q_proj"]["kernel"]))
  for sub in ("vision_encoder", "prompt_encoder", "mask_decoder"):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded["pixel"][sub]),
                 sam_params[sub])
  # The new [SEG] projection and the untouched components keep their own (here zero) values.
  assert not np.asarray(loaded["pixel"]["seg_fc1"]["kernel"]).any()
  text = "\n".join(messages)
  assert f"llm: pretrained from {llm_dir}" in text
  assert f"pretrained from {sam_dir}" in text
  assert "vision: random init" in text
  for leaf, ref in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    assert leaf.shape == ref.shape and leaf.dtype == ref.dtype


def test_mismatched_llm_is_refused_by_name(tmp_path, model_and_zero_params):
  _, params = model_and_zero_params
  config = tiny_config()
  other = tiny_config()
  other.model.llm.intermediate_size = 96
  _hf_llama(tmp_path / "llm", other.model.llm, config.model.llm.vocab_size)
  config.model.llm.pretrained_path = str(tmp_path / "llm")
  with pytest.raises(ValueError, match="intermediate_size"):
    pretrained.load_into(params, config, log=lambda m: None)
