"""The project's own modules: EarthGPTX params <-> earthgptx.safetensors, one reversible key table
(keymap.Rule) whose torch names are torch_modules.py's (prompt_encoder minus its SAE,
region_encoder, integration, the pixel decoder's non-SAM layers, box_head)."""

from __future__ import annotations

import ml_collections

from earthgptx_jax.convert.keymap import LINEAR, Rule


def _linear(t: str, f: str) -> list[Rule]:
  return [Rule(f"{t}.weight", f"{f}/kernel", (LINEAR,)), Rule(f"{t}.bias", f"{f}/bias")]


def _norm(t: str, f: str) -> list[Rule]:
  return [Rule(f"{t}.weight", f"{f}/scale"), Rule(f"{t}.bias", f"{f}/bias")]


def _attention(t: str, f: str) -> list[Rule]:
  return [r for n in ("query", "key", "value", "out") for r in _linear(f"{t}.{n}", f"{f}/{n}")]


def _ffn(t: str, f: str) -> list[Rule]:
  return _linear(f"{t}.fc1", f"{f}/fc1") + _linear(f"{t}.fc2", f"{f}/fc2")


def own_rules(model_config: ml_collections.ConfigDict) -> list[Rule]:
  """The key table of the own modules present in `model_config` (region encoder, box head and
  the mixed dense projection only where the config turns them on)."""
  p = "prompt_encoder"
  rules = [*_linear(f"{p}.geometry_proj", f"{p}/geometry_proj"),
           Rule(f"{p}.corner_embed", f"{p}/corner_embed"),
           Rule(f"{p}.queries", f"{p}/queries"), Rule(f"{p}.type_embed", f"{p}/type_embed"),
           *_norm(f"{p}.context_norm", f"{p}/context_norm"),
           *_norm(f"{p}.query_norm", f"{p}/query_norm"),
           *_attention(f"{p}.pool", f"{p}/pool"),
           *_norm(f"{p}.pool_ffn_norm", f"{p}/pool_ffn_norm"), *_ffn(f"{p}.pool_ffn", f"{p}/pool_ffn"),
           *_norm(f"{p}.out_norm", f"{p}/out_norm"), *_linear(f"{p}.out", f"{p}/out")]
  i = "integration"
  rules += _linear(f"{i}.image_in", f"{i}/image_in")
  rules += _linear(f"{i}.image_position", f"{i}/image_position")
  for norm in ("image_norm", "prompt_norm", "cross_query_norm", "cross_context_norm",
               "joint_norm", "final_norm"):
    rules += _norm(f"{i}.{norm}", f"{i}/{norm}")
  for attn in ("image_self_attn", "cross_attn", "joint_self_attn"):
    rules += _attention(f"{i}.{attn}", f"{i}/{attn}")
  rules += _ffn(f"{i}.prompt_ffn", f"{i}/prompt_ffn") + _ffn(f"{i}.projector", f"{i}/projector")
  if model_config.prompt.region.sources:
    r = "region_encoder"
    rules += _norm(f"{r}.norm", f"{r}/norm") + _linear(f"{r}.fc1", f"{r}/fc1")
    rules += _linear(f"{r}.fc2", f"{r}/fc2")
    if model_config.prompt.region.box_features:
      rules += _linear(f"{r}.box_proj", f"{r}/box_proj")
  rules += _linear("pixel.seg_fc1", "pixel/seg_fc1") + _linear("pixel.seg_fc2", "pixel/seg_fc2")
  if model_config.box.head:
    rules += [r for n in ("query", "key", "value", "fc1", "fc2")
              for r in _linear(f"box_head.{n}", f"box_head/{n}")]
    rules += _norm("box_head.query_norm", "box_head/query_norm")
    rules += _norm("box_head.feature_norm", "box_head/feature_norm")
    rules.append(Rule("box_head.position", "box_head/position"))
  if model_config.pixel.image_encoder == "mixed":
    rules += _linear("pixel.dense_proj", "pixel/dense_proj") + _norm("pixel.dense_norm",
                                                                     "pixel/dense_norm")
  return rules
