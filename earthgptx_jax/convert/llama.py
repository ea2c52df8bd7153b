"""transformers `LlamaForCausalLM` folders <-> `models.llama.Llama` params, both directions.

The weight map is one declarative table (`llama_rules`) run by `convert.keymap`: forward
for HF -> Flax, inverted for Flax -> HF, so the round trip is exact by construction. HF
checkpoints already store q/k in the rotate-half RoPE layout our module uses, so the only
transforms are Linear transposes and head reshapes. Tensors keep their dtype (bf16 stays
bf16). Scanned params (`layers`, a leading layer axis) are stacked from / split into the
per-layer table.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from earthgptx_jax.convert import keymap
from earthgptx_jax.convert.keymap import LINEAR, ConversionError, Rule
from earthgptx_jax.models import llama

# model.llm fields <- HF config.json fields (architecture only; dtype / remat / scan are ours).
_HF_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "max_position_embeddings": "max_position_embeddings",
    "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings",
}
# Keys HF may store that carry no weights of ours.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def llama_rules(llm_config: Mapping) -> list[Rule]:
  """HF state-dict key <-> per-layer Flax path (`layers_{i}/...`) with transforms."""
  c = llm_config
  d, n, k, h = c["hidden_size"], c["num_heads"], c["num_kv_heads"], c["head_dim"]
  heads = lambda num: keymap.reshape((d, num * h), (d, num, h))  # noqa: E731
  layer = [
      Rule("model.layers.{i}.self_attn.q_proj.weight", "layers_{i}/self_attn/q_proj/kernel",
           (LINEAR, heads(n))),
      Rule("model.layers.{i}.self_attn.k_proj.weight", "layers_{i}/self_attn/k_proj/kernel",
           (LINEAR, heads(k))),
      Rule("model.layers.{i}.self_attn.v_proj.weight", "layers_{i}/self_attn/v_proj/kernel",
           (LINEAR, heads(k))),
      Rule("model.layers.{i}.self_attn.o_proj.weight", "layers_{i}/self_attn/o_proj/kernel",
           (LINEAR, keymap.reshape((n * h, d), (n, h, d)))),
      Rule("model.layers.{i}.mlp.gate_proj.weight", "layers_{i}/mlp/gate_proj/kernel", (LINEAR,)),
      Rule("model.layers.{i}.mlp.up_proj.weight", "layers_{i}/mlp/up_proj/kernel", (LINEAR,)),
      Rule("model.layers.{i}.mlp.down_proj.weight", "layers_{i}/mlp/down_proj/kernel", (LINEAR,)),
      Rule("model.layers.{i}.input_layernorm.weight", "layers_{i}/input_layernorm/weight"),
      Rule("model.layers.{i}.post_attention_layernorm.weight",
           "layers_{i}/post_attention_layernorm/weight"),
  ]
  rules = [Rule("model.embed_tokens.weight", "embed_tokens/embedding"),
           *keymap.expand(layer, i=c["num_layers"]),
           Rule("model.norm.weight", "norm/weight")]
  if not c["tie_word_embeddings"]:
    rules.append(Rule("lm_head.weight", "lm_head/kernel", (LINEAR,)))
  return rules


# ----------------------------------------------------------------------------------------------
# Configs.


def hf_to_llm_config(hf: Mapping, base: ml_collections.ConfigDict | None = None
                     ) -> ml_collections.ConfigDict:
  """HF config.json dict -> `model.llm` ConfigDict (runtime fields from `base`).

  Raises ConversionError naming the field when the checkpoint is not a Llama or uses a
  feature the module does not implement (biases, other activations, unknown RoPE types).
  """
  model_type = hf.get("model_type")
  if model_type != "llama":
    raise ConversionError(f"config.json: model_type={model_type!r}, expected 'llama'")
  for field, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
    if hf.get(field, want) != want:
      raise ConversionError(f"config.json: {field}={hf[field]!r} is not supported "
                            f"(module implements {want!r})")
  if base is None:
    from configs import fusion  # runtime defaults: fp32, no remat, no scan
    base = fusion.get_config("tiny").model.llm
  cfg = ml_collections.ConfigDict(base.to_dict())
  for ours, theirs in _HF_FIELDS.items():
    if theirs not in hf:
      if ours == "num_kv_heads":
        cfg[ours] = hf["num_attention_heads"]
        continue
      if ours == "tie_word_embeddings":
        cfg[ours] = False
        continue
      raise ConversionError(f"config.json: missing field {theirs!r}")
    cfg[ours] = hf[theirs]
  cfg.head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
  rope = dict(hf.get("rope_parameters") or {})  # transformers 5 layout
  legacy = dict(hf.get("rope_scaling") or {})  # transformers 4 layout
  rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
  rope = rope or legacy
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  cfg.rope_theta = float(rope_theta)
  cfg.rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}
  try:
    llama.check_config(cfg)
  except ValueError as e:
    raise ConversionError(f"config.json: {e}") from None
  return cfg


def llm_to_hf_config(llm_config: Mapping, dtype: str) -> dict:
  """`model.llm` -> the config.json transformers writes for the same LlamaForCausalLM."""
  import transformers  # lazy: torch / transformers load only when weights are converted
  c = llm_config
  rope = {"rope_type": "default", "rope_theta": float(c["rope_theta"])}
  if c["rope_scaling"] is not None:
    rope = {**dict(c["rope_scaling"]), "rope_theta": float(c["rope_theta"])}
  hf = transformers.LlamaConfig(
      **{theirs: c[ours] for ours, theirs in _HF_FIELDS.items()}, head_dim=c["head_dim"],
      rope_parameters=rope, hidden_act="silu", attention_bias=False, mlp_bias=False, dtype=dtype,
      architectures=["LlamaForCausalLM"])
  # Every other field of the pretrained folder's config.json is kept (pretrained.resolve_config).
  return keymap.keep_original_fields(hf.to_dict(), c.get("pretrained_config", None))


# ----------------------------------------------------------------------------------------------
# Layer stacking for `scan_layers`.


def stack_layers(flat: Mapping[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
  """`layers_{i}/X` (per layer) -> `layers/X` with a leading [num_layers] axis."""
  out = {p: v for p, v in flat.items() if not p.startswith("layers_")}
  suffixes = sorted({p.split("/", 1)[1] for p in flat if p.startswith("layers_0/")})
  for s in suffixes:
    out[f"layers/{s}"] = np.stack([np.asarray(flat[f"layers_{i}/{s}"]) for i in range(num_layers)])
  return out


def unstack_layers(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Inverse of `stack_layers`; a tree without `layers/` is returned as is."""
  out = {}
  for p, v in flat.items():
    if p.startswith("layers/"):
      for i in range(v.shape[0]):
        out[f"layers_{i}/{p.split('/', 1)[1]}"] = np.asarray(v[i])
    else:
      out[p] = v
  return out


# ----------------------------------------------------------------------------------------------
# Folders.


def expected_params(llm_config: ml_collections.ConfigDict) -> dict:
  """Shapes of the unscanned module's params (ShapeDtypeStructs), without allocating them."""
  cfg = ml_collections.ConfigDict(llm_config.to_dict())
  cfg.scan_layers = False
  ids = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: llama.Llama(cfg).init(jax.random.key(0), ids))
  return nn.meta.unbox(shapes)["params"]


def load_hf_llama(folder: str | os.PathLike, base_config: ml_collections.ConfigDict | None = None
                  ) -> tuple[ml_collections.ConfigDict, dict]:
  """A local HF LlamaForCausalLM folder -> (model.llm ConfigDict, params as numpy arrays).

  `base_config` supplies the runtime fields (dtype, remat, scan_layers, attention_impl); its
  `scan_layers` decides the params layout. `param_dtype` is set to the checkpoint's dtype.
  """
  folder = pathlib.Path(folder)
  config_file = folder / "config.json"
  if not config_file.is_file():
    raise ConversionError(f"{folder}: no config.json; not a transformers checkpoint folder")
  cfg = hf_to_llm_config(json.loads(config_file.read_text()), base_config)
  state = keymap.load_safetensors(folder)
  state = {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}
  if cfg.tie_word_embeddings and "lm_head.weight" in state:
    if not np.array_equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
      raise ConversionError("config.json: tie_word_embeddings=True but lm_head.weight differs "
                            "from model.embed_tokens.weight")
    del state["lm_head.weight"]
  params = keymap.to_flax(state, llama_rules(cfg), expected=expected_params(cfg))
  flat = keymap.flatten(params)
  if cfg.scan_layers:
    flat = stack_layers(flat, cfg.num_layers)
  dtypes = {str(v.dtype) for v in flat.values()}
  if len(dtypes) == 1:
    cfg.param_dtype = dtypes.pop()
  return cfg, keymap.unflatten(flat)


def save_hf_llama(params: Mapping, llm_config: Mapping, folder: str | os.PathLike, *,
                  max_shard_bytes: int | None = None) -> None:
  """Writes config.json + safetensors (sharded with an index above `max_shard_bytes`) that
  `transformers.LlamaForCausalLM.from_pretrained(folder)` loads; tensors keep their dtype."""
  params = nn.meta.unbox(params)
  if "params" in params and "embed_tokens" not in params:
    params = params["params"]
  flat = unstack_layers({p: np.asarray(jax.device_get(v))
                         for p, v in keymap.flatten(params).items()})
  state = keymap.to_torch(keymap.unflatten(flat), llama_rules(llm_config))
  dtypes = sorted({str(v.dtype) for v in state.values()})
  dtype = dtypes[0] if len(dtypes) == 1 else "float32"
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  keymap.save_safetensors(state, folder, max_shard_bytes=max_shard_bytes)
  (folder / "config.json").write_text(
      json.dumps(llm_to_hf_config(llm_config, dtype), indent=2, sort_keys=True))
