"""Vision encoder weights <-> Flax params: ConvNeXt (timm / open_clip / HF) and DINOv2 (HF).

Layouts:
  * timm / open_clip ConvNeXt state dicts (safetensors, or open_clip's torch `.bin` / `.pt`):
    `stem.0.weight`, `stages.{i}.blocks.{j}.conv_dw.weight`, `head.norm.weight`, ... with any
    prefix (`trunk.` in an open_clip visual tower, `visual.trunk.` in a whole CLIP model such
    as laion `CLIP-convnext_large_d_320`). Only the trunk is read: the CLIP projection
    (`visual.head.*`), the text tower and `logit_scale` are not part of the encoder.
  * HF `ConvNextModel` / `ConvNextForImageClassification` folders (config.json + safetensors).
  * HF `Dinov2Model` / `Dinov2WithRegistersModel` folders, in the on-disk key names transformers
    writes and the hub stores (`attention.attention.query.weight`, `mlp.weights_in.weight`, ...).
Each layout is one declarative rule table run by `convert.keymap`, forward for import and
inverted for export, so round trips are bit-identical. Tensors keep their dtype.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
from flax import linen as nn

from earthgptx_jax.convert import keymap
from earthgptx_jax.convert.keymap import CONV2D, LINEAR, ConversionError, Rule
from earthgptx_jax.models import convnext as convnext_lib
from earthgptx_jax.models import vit as vit_lib

CONVNEXT_LAYOUTS = ("timm", "open_clip", "hf")
OPEN_CLIP_TRUNK_PREFIX = "visual.trunk."


def _norm(torch_prefix: str, flax_prefix: str) -> list[Rule]:
  return [Rule(f"{torch_prefix}.weight", f"{flax_prefix}/scale"),
          Rule(f"{torch_prefix}.bias", f"{flax_prefix}/bias")]


def _linear(torch_prefix: str, flax_prefix: str, bias: bool = True) -> list[Rule]:
  rules = [Rule(f"{torch_prefix}.weight", f"{flax_prefix}/kernel", (LINEAR,))]
  return rules + [Rule(f"{torch_prefix}.bias", f"{flax_prefix}/bias")] if bias else rules


def _conv(torch_prefix: str, flax_prefix: str) -> list[Rule]:
  return [Rule(f"{torch_prefix}.weight", f"{flax_prefix}/kernel", (CONV2D,)),
          Rule(f"{torch_prefix}.bias", f"{flax_prefix}/bias")]


# ----------------------------------------------------------------------------------------------
# ConvNeXt.


# timm's `stem` Sequential: convs (index per conv) and the closing LayerNorm's index, by stem
# type (GELU, between the overlap_act convs, has no weights but takes index 1).
_TIMM_STEMS = {"patch": ((0,), 1), "overlap": ((0, 1), 2), "overlap_tiered": ((0, 1), 2),
               "overlap_act": ((0, 2), 3)}


def convnext_rules(config: Mapping, layout: str = "timm") -> list[Rule]:
  """Rules for `models.convnext.ConvNeXt` params; `layout` is timm (= open_clip's trunk) or hf."""
  c = config
  if layout == "timm":
    convs, norm = _TIMM_STEMS[c["stem_type"]]
    stem = [f"stem.{k}" for k in convs] + [f"stem.{norm}"]
    names = dict(down_norm="stages.{i}.downsample.0",
                 down_conv="stages.{i}.downsample.1", block="stages.{i}.blocks.{j}",
                 dw="conv_dw", norm="norm", fc1="mlp.fc1", fc2="mlp.fc2", gamma="gamma",
                 head="head.norm")
  elif layout == "hf":
    _check_hf_representable(c)
    stem = ["embeddings.patch_embeddings", "embeddings.layernorm"]
    names = dict(down_norm="encoder.stages.{i}.downsampling_layer.0",
                 down_conv="encoder.stages.{i}.downsampling_layer.1",
                 block="encoder.stages.{i}.layers.{j}", dw="dwconv", norm="layernorm",
                 fc1="pwconv1", fc2="pwconv2", gamma="layer_scale_parameter", head="layernorm")
  else:
    raise ValueError(f"layout: unknown value {layout!r}; expected timm or hf")
  *stem_convs, stem_norm = stem
  rules = _norm(stem_norm, "stem_norm")
  for torch_name, flax_name in zip(stem_convs, ("stem_conv", "stem_conv2")):
    rules += _conv(torch_name, flax_name)
  strides = convnext_lib.stage_strides(c)
  for i, depth in enumerate(c["depths"]):
    if strides[i] > 1:
      rules += _norm(names["down_norm"].format(i=i), f"stages_{i}_downsample_norm")
      rules += _conv(names["down_conv"].format(i=i), f"stages_{i}_downsample_conv")
    for j in range(depth):
      t, f = names["block"].format(i=i, j=j), f"stages_{i}_blocks_{j}"
      rules += _conv(f"{t}.{names['dw']}", f"{f}/conv_dw")
      rules += _norm(f"{t}.{names['norm']}", f"{f}/norm")
      rules += _linear(f"{t}.{names['fc1']}", f"{f}/fc1")
      rules += _linear(f"{t}.{names['fc2']}", f"{f}/fc2")
      if c["layer_scale_init"] is not None:
        rules.append(Rule(f"{t}.{names['gamma']}", f"{f}/gamma"))
  return rules + _norm(names["head"], "head_norm")


def _check_hf_representable(config: Mapping) -> None:
  """HF's ConvNext has only the patch stem and never downsamples its first stage, where timm
  (and this trunk) does after a stride-2 stem: those trunks have no HF equivalent."""
  if config["stem_type"] != "patch" or config["patch_size"] == 2:
    raise ConversionError(f"convnext: stem_type={config['stem_type']!r}, "
                          f"patch_size={config['patch_size']} has no HF ConvNext equivalent "
                          f"(HF: patch stem, no stage-0 downsampling); use the timm layout")


def convnext_config_from_state(state: Mapping[str, np.ndarray],
                               base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Sizes read off a timm-layout trunk state dict (no prefix); other fields from `base`."""
  if "stem.0.weight" not in state:
    raise ConversionError("ConvNeXt state dict: no 'stem.0.weight'; not a timm ConvNeXt trunk")
  stem = state["stem.0.weight"]
  if "stem.3.weight" in state:
    stem_type = "overlap_act"
  elif state["stem.1.weight"].ndim == 4:
    halved = state["stem.0.weight"].shape[0] != state["stem.1.weight"].shape[0]
    stem_type = "overlap_tiered" if halved else "overlap"
  else:
    stem_type = "patch"
  stages = sorted({int(k.split(".")[1]) for k in state if k.startswith("stages.")})
  depths, dims = [], []
  for i in stages:
    blocks = {int(k.split(".")[3]) for k in state if k.startswith(f"stages.{i}.blocks.")}
    depths.append(max(blocks) + 1 if blocks else 0)
    dims.append(int(state[f"stages.{i}.blocks.0.conv_dw.weight"].shape[0]) if blocks else
                int(state[f"stages.{i}.downsample.1.weight"].shape[0]))
  fc1 = state.get("stages.0.blocks.0.mlp.fc1.weight")
  if fc1 is not None and fc1.ndim != 2:
    raise ConversionError(f"ConvNeXt state dict: mlp.fc1.weight has shape {fc1.shape}; "
                          f"conv-MLP variants (conv_mlp=True) are not supported")
  cfg = ml_collections.ConfigDict(base.to_dict())
  cfg.depths, cfg.dims = tuple(depths), tuple(dims)
  cfg.stem_type, cfg.in_channels = stem_type, int(stem.shape[1])
  cfg.patch_size = int(stem.shape[2]) if stem_type == "patch" else 4
  cfg.kernel_size = int(state["stages.0.blocks.0.conv_dw.weight"].shape[-1])
  if fc1 is not None:
    cfg.mlp_ratio = fc1.shape[0] // fc1.shape[1]
  if "stages.0.blocks.0.gamma" not in state:
    cfg.layer_scale_init = None
  return cfg


def convnext_config_from_hf(hf: Mapping, base: ml_collections.ConfigDict
                            ) -> ml_collections.ConfigDict:
  if hf.get("model_type") != "convnext":
    raise ConversionError(f"config.json: model_type={hf.get('model_type')!r}, expected 'convnext'")
  if hf.get("hidden_act", "gelu") != "gelu":
    raise ConversionError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported")
  cfg = ml_collections.ConfigDict(base.to_dict())
  cfg.depths, cfg.dims = tuple(hf["depths"]), tuple(hf["hidden_sizes"])
  cfg.in_channels, cfg.patch_size = hf["num_channels"], hf["patch_size"]
  cfg.stem_type, cfg.kernel_size, cfg.mlp_ratio = "patch", 7, 4
  _check_hf_representable(cfg)
  cfg.layer_scale_init = hf["layer_scale_init_value"] if hf["layer_scale_init_value"] > 0 else None
  # HF hard-codes eps 1e-6 inside the trunk; config.layer_norm_eps is its pooler norm's.
  cfg.layer_norm_eps, cfg.head_norm_eps = 1e-6, hf.get("layer_norm_eps", 1e-12)
  return cfg


def convnext_hf_config(config: Mapping) -> dict:
  """`model.vision.convnext` -> the config.json transformers writes for that ConvNextModel."""
  import transformers  # lazy: torch / transformers load only when weights are converted
  c = config
  _check_hf_representable(c)
  if c["kernel_size"] != 7 or c["mlp_ratio"] != 4 or c["layer_norm_eps"] != 1e-6:
    raise ConversionError("convnext: HF ConvNext fixes kernel_size=7, mlp_ratio=4, eps=1e-6")
  return transformers.ConvNextConfig(
      num_channels=c["in_channels"], patch_size=c["patch_size"], depths=list(c["depths"]),
      hidden_sizes=list(c["dims"]), layer_scale_init_value=c["layer_scale_init"] or 0.0,
      layer_norm_eps=c["head_norm_eps"], architectures=["ConvNextModel"]).to_dict()


def _expected(module: nn.Module, example: jax.ShapeDtypeStruct) -> dict:
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(example.shape,
                                                                           example.dtype)))
  return nn.meta.unbox(shapes)["params"]


def convnext_expected_params(config: ml_collections.ConfigDict) -> dict:
  side = convnext_lib.total_stride(config, -1)
  return _expected(convnext_lib.ConvNeXt(config),
                   jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32))


def _load_state(path: pathlib.Path) -> dict[str, np.ndarray]:
  """safetensors (file or folder) or a torch `.bin` / `.pt` / `.pth` state dict."""
  if path.is_dir():
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
      if (path / name).is_file():
        return _load_state(path / name)
    return keymap.load_safetensors(path)
  if path.suffix == ".safetensors":
    return keymap.load_safetensors(path)
  if path.suffix in (".bin", ".pt", ".pth"):
    import torch  # lazy: torch / transformers load only when weights are converted
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {k: _tensor_to_numpy(v) for k, v in state.items()}
  raise ConversionError(f"{path}: expected a safetensors file / folder or a torch .bin/.pt/.pth")


def load_convnext(path: str | os.PathLike, base: ml_collections.ConfigDict
                  ) -> tuple[ml_collections.ConfigDict, dict]:
  """A timm / open_clip ConvNeXt checkpoint or an HF ConvNext folder -> (config, params).

  `base` (`model.vision.convnext`) gives the runtime fields (dtype, remat, mean / std); sizes
  come from the checkpoint.
  """
  path = pathlib.Path(path)
  if path.is_dir() and (path / "config.json").is_file():
    cfg = convnext_config_from_hf(json.loads((path / "config.json").read_text()), base)
    state = keymap.load_safetensors(path)
    prefix = "convnext." if any(k.startswith("convnext.") for k in state) else ""
    state = {k[len(prefix):]: v for k, v in state.items()
             if k.startswith(prefix) and not k.startswith("classifier.")}
    layout = "hf"
  else:
    state = _load_state(path)
    stems = [k for k in state if k.endswith("stem.0.weight")]
    if len(stems) != 1:
      raise ConversionError(f"{path}: expected one ConvNeXt trunk ('...stem.0.weight'), found "
                            f"{stems or 'none'}")
    prefix = stems[0][:-len("stem.0.weight")]
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    # timm's classifier (`head.fc`) is not part of the encoder; `head.norm` is.
    state = {k: v for k, v in state.items() if not k.startswith("head.fc.")}
    cfg = convnext_config_from_state(state, base)
    layout = "timm"
  params = keymap.to_flax(state, convnext_rules(cfg, layout),
                          expected=convnext_expected_params(cfg))
  return cfg, params


def save_convnext(params: Mapping, config: Mapping, path: str | os.PathLike,
                  layout: str = "timm") -> None:
  """Writes `params` as a timm trunk (`path` = a .safetensors file), an open_clip CLIP visual
  trunk (keys under `visual.trunk.`, a .safetensors file) or an HF ConvNextModel folder."""
  if layout not in CONVNEXT_LAYOUTS:
    raise ValueError(f"layout: unknown value {layout!r}; expected one of {CONVNEXT_LAYOUTS}")
  rules = convnext_rules(config, "hf" if layout == "hf" else "timm")
  state = keymap.to_torch(_numpy(params), rules)
  path = pathlib.Path(path)
  if layout == "hf":
    keymap.save_safetensors(state, path)
    (path / "config.json").write_text(json.dumps(convnext_hf_config(config), indent=2,
                                                 sort_keys=True))
    return
  if layout == "open_clip":
    state = {OPEN_CLIP_TRUNK_PREFIX + k: v for k, v in state.items()}
  _save_file(state, path)


# ----------------------------------------------------------------------------------------------
# DINOv2.


def dinov2_rules(config: Mapping) -> list[Rule]:
  """HF Dinov2(WithRegisters) on-disk keys <-> `models.vit.ViT` params."""
  c = config
  rules = [Rule("embeddings.cls_token", "cls_token"),
           Rule("embeddings.position_embeddings", "position_embeddings"),
           *_conv("embeddings.patch_embeddings.projection", "patch_embed")]
  if c["use_mask_token"]:
    rules.append(Rule("embeddings.mask_token", "mask_token"))
  if c["num_register_tokens"]:
    rules.append(Rule("embeddings.register_tokens", "register_tokens"))
  mlp = (("mlp.weights_in", "weights_in"), ("mlp.weights_out", "weights_out")) if c[
      "use_swiglu_ffn"] else (("mlp.fc1", "fc1"), ("mlp.fc2", "fc2"))
  layer = [*_norm("encoder.layer.{i}.norm1", "layers_{i}/norm1"),
           *_norm("encoder.layer.{i}.norm2", "layers_{i}/norm2"),
           *[r for n in ("query", "key", "value")
             for r in _linear(f"encoder.layer.{{i}}.attention.attention.{n}", f"layers_{{i}}/{n}",
                              c["qkv_bias"])],
           *_linear("encoder.layer.{i}.attention.output.dense", "layers_{i}/out"),
           Rule("encoder.layer.{i}.layer_scale1.lambda1", "layers_{i}/layer_scale1"),
           Rule("encoder.layer.{i}.layer_scale2.lambda1", "layers_{i}/layer_scale2"),
           *[r for t, f in mlp for r in _linear(f"encoder.layer.{{i}}.{t}", f"layers_{{i}}/{f}")]]
  return rules + keymap.expand(layer, i=c["num_layers"]) + _norm("layernorm", "norm")


# model.vision.dino fields <- HF config.json fields.
_DINO_FIELDS = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
                "num_heads": "num_attention_heads", "mlp_ratio": "mlp_ratio",
                "patch_size": "patch_size", "in_channels": "num_channels",
                "pretrain_image_size": "image_size", "layer_norm_eps": "layer_norm_eps",
                "layerscale_value": "layerscale_value", "use_swiglu_ffn": "use_swiglu_ffn",
                "qkv_bias": "qkv_bias", "initializer_range": "initializer_range"}
_DINO_TYPES = {"dinov2": False, "dinov2_with_registers": True}  # -> antialiased pos resize


def dinov2_config_from_hf(hf: Mapping, base: ml_collections.ConfigDict
                          ) -> ml_collections.ConfigDict:
  model_type = hf.get("model_type")
  if model_type not in _DINO_TYPES:
    raise ConversionError(f"config.json: model_type={model_type!r}, expected one of "
                          f"{tuple(_DINO_TYPES)}")
  if hf.get("hidden_act", "gelu") != "gelu":
    raise ConversionError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported")
  cfg = ml_collections.ConfigDict(base.to_dict())
  for ours, theirs in _DINO_FIELDS.items():
    if theirs not in hf:
      raise ConversionError(f"config.json: missing field {theirs!r}")
    cfg[ours] = hf[theirs]
  cfg.num_register_tokens = hf.get("num_register_tokens", 0)
  cfg.use_mask_token = hf.get("use_mask_token", True)
  cfg.pos_interp_antialias = _DINO_TYPES[model_type]
  vit_lib.check_config(cfg)
  return cfg


def dinov2_hf_config(config: Mapping) -> dict:
  """`model.vision.dino` -> config.json of the matching HF Dinov2(WithRegisters)Model, with
  every other field of the pretrained folder's config.json (`pretrained_config`) kept."""
  c = config
  return keymap.keep_original_fields(_dinov2_hf_config(c), c.get("pretrained_config", None))


def _dinov2_hf_config(config: Mapping) -> dict:
  import transformers  # lazy: torch / transformers load only when weights are converted
  c = config
  kwargs = {theirs: c[ours] for ours, theirs in _DINO_FIELDS.items()}
  if float(c["mlp_ratio"]).is_integer():  # HF's config class validates an int
    kwargs["mlp_ratio"] = int(c["mlp_ratio"])
  if c["pos_interp_antialias"]:
    if not c["use_mask_token"]:
      raise ConversionError("dino: Dinov2WithRegisters always has a mask token")
    return transformers.Dinov2WithRegistersConfig(
        **kwargs, num_register_tokens=c["num_register_tokens"],
        architectures=["Dinov2WithRegistersModel"]).to_dict()
  if c["num_register_tokens"]:
    raise ConversionError("dino: register tokens need pos_interp_antialias=True "
                          "(HF Dinov2WithRegisters)")
  return transformers.Dinov2Config(**kwargs, use_mask_token=c["use_mask_token"],
                                   architectures=["Dinov2Model"]).to_dict()


def dinov2_expected_params(config: ml_collections.ConfigDict) -> dict:
  side = config.patch_size
  return _expected(vit_lib.ViT(config),
                   jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32))


def load_dinov2(folder: str | os.PathLike, base: ml_collections.ConfigDict
                ) -> tuple[ml_collections.ConfigDict, dict]:
  """An HF Dinov2Model / Dinov2WithRegistersModel (or *ForImageClassification) folder ->
  (config, params); `base` (`model.vision.dino`) gives runtime fields and mean / std."""
  folder = pathlib.Path(folder)
  if not (folder / "config.json").is_file():
    raise ConversionError(f"{folder}: no config.json; not a transformers checkpoint folder")
  cfg = dinov2_config_from_hf(json.loads((folder / "config.json").read_text()), base)
  state = keymap.load_safetensors(folder)
  cls_keys = [k for k in state if k.endswith("embeddings.cls_token")]
  if len(cls_keys) != 1:
    raise ConversionError(f"{folder}: expected one 'embeddings.cls_token', found {cls_keys}")
  prefix = cls_keys[0][:-len("embeddings.cls_token")]
  state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  return cfg, keymap.to_flax(state, dinov2_rules(cfg), expected=dinov2_expected_params(cfg))


def save_dinov2(params: Mapping, config: Mapping, folder: str | os.PathLike) -> None:
  """Writes config.json + model.safetensors that HF `Dinov2Model.from_pretrained` loads."""
  state = keymap.to_torch(_numpy(params), dinov2_rules(config))
  folder = pathlib.Path(folder)
  keymap.save_safetensors(state, folder)
  (folder / "config.json").write_text(json.dumps(dinov2_hf_config(config), indent=2,
                                                 sort_keys=True))


# ----------------------------------------------------------------------------------------------
# The mixed encoder.


def load_pretrained(vision_config: ml_collections.ConfigDict, params: Mapping) -> dict:
  """`MixedVisionEncoder` params with `convnext` / `dino` replaced from their
  `pretrained_path` where set; raises when a checkpoint's sizes differ from the config."""
  params = dict(nn.meta.unbox(params))
  for name, loader in (("convnext", load_convnext), ("dino", load_dinov2)):
    sub = vision_config[name]
    if not sub.pretrained_path:
      continue
    cfg, loaded = loader(sub.pretrained_path, sub)
    for field in cfg.keys():
      if field != "pretrained_path" and cfg[field] != sub[field]:
        raise ConversionError(f"model.vision.{name}.{field}={sub[field]!r} but the checkpoint "
                              f"{sub.pretrained_path} has {cfg[field]!r}")
    params[name] = jax.tree.map(jnp.asarray, loaded)
  return params


def _numpy(params: Mapping) -> dict:
  params = nn.meta.unbox(params)
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), dict(params))


def _tensor_to_numpy(t) -> np.ndarray:
  """torch tensor -> numpy, bf16 kept as ml_dtypes.bfloat16 (numpy has no bf16)."""
  import torch  # lazy: torch / transformers load only when weights are converted
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _save_file(state: Mapping[str, np.ndarray], path: pathlib.Path) -> None:
  if path.suffix != ".safetensors":
    raise ValueError(f"path: expected a .safetensors file for this layout, got {path}")
  import torch  # lazy: torch / transformers load only when weights are converted
  from safetensors.torch import save_file  # lazy: torch / transformers load only when weights are converted

  def as_torch(x):
    x = np.ascontiguousarray(x)
    if x.dtype == ml_dtypes.bfloat16:
      return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)

  path.parent.mkdir(parents=True, exist_ok=True)
  save_file({k: as_torch(v) for k, v in state.items()}, str(path), {"format": "pt"})
