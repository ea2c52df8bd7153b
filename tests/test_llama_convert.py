"""HF LlamaForCausalLM folders <-> Flax params: exact round trips, sharded folders, bad input."""

import json

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from configs import fusion
from earthgptx_jax.convert import keymap
from earthgptx_jax.convert import llama as convert
from earthgptx_jax.convert.keymap import ConversionError

HF_KW = dict(vocab_size=67, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=6,
             max_position_embeddings=64)


def _save_hf(folder, dtype=torch.float32, seed=0, **overrides):
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**HF_KW, **overrides}))
  model = model.to(dtype)
  model.save_pretrained(folder)
  return model


def _base(scan):
  base = fusion.get_config("tiny").model.llm
  base.scan_layers = scan
  return base


def _assert_state_dicts_identical(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    x, y = a[k], b[k]
    assert x.dtype == y.dtype and x.shape == y.shape, k
    np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8), err_msg=k)


@pytest.mark.parametrize("dtype,scan,tied", [
    (torch.float32, False, False),
    (torch.bfloat16, True, False),
    (torch.float32, True, True),
])
def test_round_trip_is_bit_identical(tmp_path, dtype, scan, tied):
  """HF -> Flax -> HF reproduces every tensor bit for bit, with its dtype, and HF loads it."""
  model = _save_hf(tmp_path / "hf", dtype, tie_word_embeddings=tied)
  cfg, params = convert.load_hf_llama(tmp_path / "hf", _base(scan))
  want = "bfloat16" if dtype == torch.bfloat16 else "float32"
  assert cfg.param_dtype == want
  assert all(str(v.dtype) == want for v in keymap.flatten(params).values())
  assert ("layers" in params) == scan
  convert.save_hf_llama(params, cfg, tmp_path / "back")
  _assert_state_dicts_identical(keymap.load_safetensors(tmp_path / "hf"),
                                keymap.load_safetensors(tmp_path / "back"))
  reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back")
  assert reloaded.dtype == dtype and reloaded.config.tie_word_embeddings == tied
  for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
    assert torch.equal(a, b), name


def test_rope_scaling_and_config_survive_round_trip(tmp_path):
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
  _save_hf(tmp_path / "hf", rope_scaling=scaling, rope_theta=5e5, rms_norm_eps=1e-5)
  cfg, params = convert.load_hf_llama(tmp_path / "hf", _base(False))
  assert cfg.rope_theta == 5e5 and cfg.rope_scaling["rope_type"] == "llama3"
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 6)
  convert.save_hf_llama(params, cfg, tmp_path / "back")
  hf = transformers.LlamaConfig.from_pretrained(tmp_path / "back")
  assert hf.rope_parameters["rope_type"] == "llama3" and hf.rope_parameters["factor"] == 8.0
  assert hf.rope_parameters["rope_theta"] == 5e5 and hf.rms_norm_eps == 1e-5
  cfg2, _ = convert.load_hf_llama(tmp_path / "back", _base(False))
  assert cfg2.to_dict() == cfg.to_dict()


def test_sharded_index_folder(tmp_path):
  """Write shards + index (as large checkpoints come); loads back the same and HF reads it."""
  _save_hf(tmp_path / "hf")
  cfg, params = convert.load_hf_llama(tmp_path / "hf", _base(True))
  convert.save_hf_llama(params, cfg, tmp_path / "sharded", max_shard_bytes=20_000)
  index = json.loads((tmp_path / "sharded" / keymap.SAFETENSORS_INDEX).read_text())
  assert len(set(index["weight_map"].values())) > 2
  _, params2 = convert.load_hf_llama(tmp_path / "sharded", _base(True))
  flat1, flat2 = keymap.flatten(params), keymap.flatten(params2)
  assert flat1.keys() == flat2.keys()
  for k in flat1:
    np.testing.assert_array_equal(flat1[k], flat2[k])
  transformers.LlamaForCausalLM.from_pretrained(tmp_path / "sharded")


def test_weight_layout_is_hf_transposed(tmp_path):
  """Pins the table: q kernel [D, N, H] is q_proj.weight^T split by heads, lm_head transposed."""
  model = _save_hf(tmp_path / "hf")
  _, params = convert.load_hf_llama(tmp_path / "hf", _base(False))
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  q = params["layers_1"]["self_attn"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(q.reshape(24, 24), sd["model.layers.1.self_attn.q_proj.weight"].T)
  o = params["layers_0"]["self_attn"]["o_proj"]["kernel"]
  assert o.shape == (4, 6, 24)
  np.testing.assert_array_equal(params["lm_head"]["kernel"], sd["lm_head.weight"].T)


def _edit_config(folder, **fields):
  path = folder / "config.json"
  cfg = json.loads(path.read_text())
  cfg.update(fields)
  path.write_text(json.dumps(cfg))


def test_errors_name_the_problem(tmp_path):
  with pytest.raises(ConversionError, match="config.json"):
    convert.load_hf_llama(tmp_path)  # empty folder
  _save_hf(tmp_path / "hf")
  folder = tmp_path / "hf"
  state = keymap.load_safetensors(folder)

  _edit_config(folder, model_type="mistral")
  with pytest.raises(ConversionError, match="model_type='mistral'"):
    convert.load_hf_llama(folder)
  _edit_config(folder, model_type="llama", attention_bias=True)
  with pytest.raises(ConversionError, match="attention_bias"):
    convert.load_hf_llama(folder)
  _edit_config(folder, attention_bias=False, num_key_value_heads=3)
  with pytest.raises(ConversionError, match="num_kv_heads"):
    convert.load_hf_llama(folder)
  _edit_config(folder, num_key_value_heads=2)

  missing = dict(state)
  del missing["model.layers.1.mlp.up_proj.weight"]
  keymap.save_safetensors(missing, folder)
  with pytest.raises(ConversionError, match="model.layers.1.mlp.up_proj.weight"):
    convert.load_hf_llama(folder)

  wrong = dict(state)
  wrong["model.layers.0.mlp.down_proj.weight"] = np.zeros((24, 41), np.float32)
  keymap.save_safetensors(wrong, folder)
  with pytest.raises(ConversionError, match=r"down_proj.*\(24, 41\).*\(40, 24\)"):
    convert.load_hf_llama(folder)

  extra = dict(state, **{"model.layers.0.self_attn.q_proj.bias": np.zeros(24, np.float32)})
  keymap.save_safetensors(extra, folder)
  with pytest.raises(ConversionError, match="q_proj.bias"):
    convert.load_hf_llama(folder)


def test_bf16_values_are_not_rounded_through_float32(tmp_path):
  """A bf16 checkpoint arrives as ml_dtypes.bfloat16 arrays holding the exact bits."""
  model = _save_hf(tmp_path / "hf", torch.bfloat16)
  _, params = convert.load_hf_llama(tmp_path / "hf", _base(False))
  emb = params["embed_tokens"]["embedding"]
  assert emb.dtype == ml_dtypes.bfloat16
  want = model.state_dict()["model.embed_tokens.weight"].view(torch.int16).numpy()
  np.testing.assert_array_equal(emb.view(np.int16), want)
