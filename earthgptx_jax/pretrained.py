"""Start a run from local pretrained weights where the config names them; random elsewhere.

  model.llm.pretrained_path              HF LlamaForCausalLM folder (embeddings resized for the
                                         project's special tokens)
  model.vision.convnext.pretrained_path  open_clip / timm CLIP-ConvNeXt state dict, or HF ConvNext
  model.vision.dino.pretrained_path      HF Dinov2 folder
  model.pixel.pretrained_path            HF SamModel folder (image encoder when
                                         image_encoder='sam', prompt encoder, mask decoder)

Every component says where it came from in one log line. Loaded weights are placed with the
shardings of the randomly initialised params they replace, so the result is laid out exactly
as the train state expects.

`resolve_config` runs before the model is built. The SAM folder's config.json decides
`model.pixel`'s architecture sizes (decoder, and the ViT with image_encoder='sam'): a preset's
value that differs is overridden, with one log line per field, since the weights fit only their
own sizes (a config.json asking for something the modules do not implement is an error naming
the field). The LLM and DINOv2 sizes are not overridden: a mismatch there is an error naming
the field, at load. Each folder's config.json text is kept in the config
(`pretrained_config`), so that exports write every field of the original.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Mapping

import jax
import ml_collections
import numpy as np

from earthgptx_jax import tokenizer as tokenizer_lib
from earthgptx_jax.convert import llama as convert_llama
from earthgptx_jax.convert import sam as convert_sam
from earthgptx_jax.convert import vision as convert_vision


def _place_like(new: Mapping, old: Mapping, name: str):
  """Puts every loaded leaf on its predecessor's sharding and dtype; shapes must agree."""
  def place(path, n, o):
    if tuple(np.shape(n)) != tuple(o.shape):
      raise ValueError(f"pretrained {name}: {jax.tree_util.keystr(path)} has shape "
                       f"{tuple(np.shape(n))}, the model expects {tuple(o.shape)}")
    return jax.device_put(np.asarray(n).astype(o.dtype), o.sharding)
  return jax.tree_util.tree_map_with_path(place, dict(new), dict(old))


def _load_llm(params, config, log):
  path = config.model.llm.pretrained_path
  cfg, loaded = convert_llama.load_hf_llama(path, config.model.llm)
  for field in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "tie_word_embeddings"):
    if cfg[field] != config.model.llm[field]:
      raise ValueError(f"model.llm.{field}={config.model.llm[field]!r} but {path} has "
                       f"{cfg[field]!r}")
  if cfg.vocab_size != config.model.llm.vocab_size:
    loaded = tokenizer_lib.resize_embeddings(loaded, int(config.model.llm.vocab_size))
  log(f"llm: pretrained from {path} (vocab {cfg.vocab_size} -> "
      f"{config.model.llm.vocab_size})")
  return _place_like(loaded, params["llm"], "llm")


def _load_vision(params, config, log):
  loaded = convert_vision.load_pretrained(config.model.vision, params["vision"])
  for name in ("convnext", "dino"):
    path = config.model.vision[name].get("pretrained_path", None)
    log(f"vision.{name}: " + (f"pretrained from {path}" if path else
                              f"random init (model.vision.{name}.pretrained_path unset)"))
  return _place_like(loaded, params["vision"], "vision")


# The components whose folder's config.json is kept for export (HF folders; ConvNeXt's
# pretrained file is a timm state dict, exported in timm's layout).
_KEEP_CONFIG = ("model.llm", "model.vision.dino", "model.pixel")


def _same(a, b) -> bool:
  """Config values equal, a JSON list and a tuple alike."""
  seq = (list, tuple)
  return tuple(a) == tuple(b) if isinstance(a, seq) and isinstance(b, seq) else a == b


def _node(config: ml_collections.ConfigDict, dotted: str) -> ml_collections.ConfigDict:
  for part in dotted.split("."):
    config = config[part]
  return config


def resolve_config(config: ml_collections.ConfigDict,
                   log: Callable[[str], None] = print) -> ml_collections.ConfigDict:
  """Fills, in place, what the pretrained folders named in `config` decide; call it before
  building the model. Returns `config`."""
  for dotted in _KEEP_CONFIG:
    node = _node(config, dotted)
    path = node.get("pretrained_path", None)
    if path and (pathlib.Path(path) / "config.json").is_file():
      node.pretrained_config = (pathlib.Path(path) / "config.json").read_text()
  pixel = config.model.pixel
  if pixel.get("pretrained_path", None):
    hf = json.loads(convert_sam.read_hf_config(pixel.pretrained_path))
    changed = []
    for field, value in convert_sam.pixel_sizes_from_hf(hf, pixel).items():
      group, name = field.split(".")
      if not _same(pixel[group][name], value):
        changed.append(f"{field} {pixel[group][name]!r} -> {value!r}")
        pixel[group][name] = value
    if changed:
      log(f"pixel: sizes from {pixel.pretrained_path}/config.json: model.pixel."
          + ", model.pixel.".join(changed))
  return config


def _load_sam(params, config, log):
  path = config.model.pixel.pretrained_path
  hf = json.loads(convert_sam.read_hf_config(path))
  for field, value in convert_sam.pixel_sizes_from_hf(hf, config.model.pixel).items():
    group, name = field.split(".")
    if not _same(config.model.pixel[group][name], value):
      raise ValueError(f"model.pixel.{field}={config.model.pixel[group][name]!r} but "
                       f"{path}/config.json has {value!r} (pretrained.resolve_config, run "
                       f"before building the model, takes the folder's sizes)")
  sam = convert_sam.load_hf_sam(path, config.model.pixel)
  merged = convert_sam.merge_pretrained(dict(params["pixel"]), sam)
  log(f"pixel: SAM {sorted(sam)} pretrained from {path}; [SEG] projection random")
  return _place_like(merged, params["pixel"], "pixel")


def load_into(params: Mapping, config: ml_collections.ConfigDict,
              log: Callable[[str], None] = print) -> dict:
  """`params` (the model's, possibly sharded) with pretrained components swapped in."""
  params = dict(params)
  if config.model.llm.get("pretrained_path", None):
    params["llm"] = _load_llm(params, config, log)
  else:
    log("llm: random init (model.llm.pretrained_path unset)")
  vision = config.model.vision
  if any(vision[n].get("pretrained_path", None) for n in ("convnext", "dino")):
    params["vision"] = _load_vision(params, config, log)
  else:
    log("vision: random init (model.vision.{convnext,dino}.pretrained_path unset)")
  if config.model.pixel.get("pretrained_path", None):
    params["pixel"] = _load_sam(params, config, log)
  else:
    log("pixel: random init (model.pixel.pretrained_path unset)")
  new = ["prompt encoder", *(["region encoder"] if config.model.prompt.region.sources else []),
         "integration, projector", *(["box head"] if config.model.box.head else [])]
  log(f"{', '.join(new)}: random init (new modules)")
  return params
