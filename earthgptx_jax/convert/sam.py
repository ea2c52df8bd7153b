"""HF `SamModel` folders (safetensors) <-> the SAM parts of `PixelDecoder`'s params.

One rule table (`sam_rules`) drives both directions through `convert/keymap.py`, so
import -> export is bit-exact. Flax paths are relative to the PixelDecoder params:
`vision_encoder/...` (only when image_encoder='sam'), `prompt_encoder/...`, `mask_decoder/...`;
the [SEG] projection (`seg_fc1`, `seg_fc2`) and the mixed-map projection are not part of SAM and
are left as they are.

HF keeps the random-Fourier matrix twice (`shared_image_embedding` and the tied
`prompt_encoder.shared_embedding`); save_pretrained writes the first only, older exports may
hold both. Here it is one parameter, read from the first key (the second, if present, must be
equal) and written back as the first.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping

import ml_collections
import numpy as np

from earthgptx_jax.convert import keymap
from earthgptx_jax.convert.keymap import CONV2D, LINEAR, ConversionError, Rule

SHARED_PE = "shared_image_embedding.positional_embedding"
TIED_PE = "prompt_encoder.shared_embedding.positional_embedding"
# ConvTranspose2d(k=2, s=2) weight [in, out, 2, 2] <-> Upsample2x kernel [in, 2, 2, out].
UPSAMPLE = keymap.transpose((0, 2, 3, 1))


def _linear(torch_prefix: str, flax_prefix: str, bias: bool = True) -> list[Rule]:
  rules = [Rule(f"{torch_prefix}.weight", f"{flax_prefix}/kernel", (LINEAR,))]
  return rules + ([Rule(f"{torch_prefix}.bias", f"{flax_prefix}/bias")] if bias else [])


def _conv(torch_prefix: str, flax_prefix: str, bias: bool = True,
          transform: keymap.Transform = CONV2D) -> list[Rule]:
  rules = [Rule(f"{torch_prefix}.weight", f"{flax_prefix}/kernel", (transform,))]
  return rules + ([Rule(f"{torch_prefix}.bias", f"{flax_prefix}/bias")] if bias else [])


def _norm(torch_prefix: str, flax_prefix: str) -> list[Rule]:
  return [Rule(f"{torch_prefix}.weight", f"{flax_prefix}/scale"),
          Rule(f"{torch_prefix}.bias", f"{flax_prefix}/bias")]


def _feed_forward(torch_prefix: str, flax_prefix: str, num_layers: int) -> list[Rule]:
  rules = _linear(f"{torch_prefix}.proj_in", f"{flax_prefix}/proj_in")
  for k in range(num_layers - 2):
    rules += _linear(f"{torch_prefix}.layers.{k}", f"{flax_prefix}/layers_{k}")
  return rules + _linear(f"{torch_prefix}.proj_out", f"{flax_prefix}/proj_out")


def _attention(torch_prefix: str, flax_prefix: str) -> list[Rule]:
  return [r for p in ("q_proj", "k_proj", "v_proj", "out_proj")
          for r in _linear(f"{torch_prefix}.{p}", f"{flax_prefix}/{p}")]


def vision_rules(vit: ml_collections.ConfigDict) -> list[Rule]:
  t, f = "vision_encoder", "vision_encoder"
  layer = [*_norm(f"{t}.layers.{{i}}.layer_norm1", f"{f}/layers_{{i}}/layer_norm1"),
           *_linear(f"{t}.layers.{{i}}.attn.qkv", f"{f}/layers_{{i}}/attn/qkv", vit.qkv_bias),
           Rule(f"{t}.layers.{{i}}.attn.rel_pos_h", f"{f}/layers_{{i}}/attn/rel_pos_h"),
           Rule(f"{t}.layers.{{i}}.attn.rel_pos_w", f"{f}/layers_{{i}}/attn/rel_pos_w"),
           *_linear(f"{t}.layers.{{i}}.attn.proj", f"{f}/layers_{{i}}/attn/proj"),
           *_norm(f"{t}.layers.{{i}}.layer_norm2", f"{f}/layers_{{i}}/layer_norm2"),
           *_linear(f"{t}.layers.{{i}}.mlp.lin1", f"{f}/layers_{{i}}/mlp/lin1"),
           *_linear(f"{t}.layers.{{i}}.mlp.lin2", f"{f}/layers_{{i}}/mlp/lin2")]
  return [*_conv(f"{t}.patch_embed.projection", f"{f}/patch_embed"),
          Rule(f"{t}.pos_embed", f"{f}/pos_embed"),
          *keymap.expand(layer, i=vit.num_layers),
          *_conv(f"{t}.neck.conv1", f"{f}/neck_conv1", bias=False),
          *_norm(f"{t}.neck.layer_norm1", f"{f}/neck_layer_norm1"),
          *_conv(f"{t}.neck.conv2", f"{f}/neck_conv2", bias=False),
          *_norm(f"{t}.neck.layer_norm2", f"{f}/neck_layer_norm2")]


def prompt_encoder_rules(dec: ml_collections.ConfigDict) -> list[Rule]:
  t = f = "prompt_encoder"
  vec = (keymap.reshape((1, dec.hidden_size), (dec.hidden_size,)),)
  return [Rule(SHARED_PE, f"{f}/shared_embedding/positional_embedding"),
          *_conv(f"{t}.mask_embed.conv1", f"{f}/mask_embed/conv1"),
          *_norm(f"{t}.mask_embed.layer_norm1", f"{f}/mask_embed/layer_norm1"),
          *_conv(f"{t}.mask_embed.conv2", f"{f}/mask_embed/conv2"),
          *_norm(f"{t}.mask_embed.layer_norm2", f"{f}/mask_embed/layer_norm2"),
          *_conv(f"{t}.mask_embed.conv3", f"{f}/mask_embed/conv3"),
          Rule(f"{t}.no_mask_embed.weight", f"{f}/no_mask_embed", vec),
          Rule(f"{t}.not_a_point_embed.weight", f"{f}/not_a_point_embed", vec),
          *keymap.expand([Rule(f"{t}.point_embed.{{i}}.weight", f"{f}/point_embed_{{i}}", vec)],
                         i=4)]


def mask_decoder_rules(dec: ml_collections.ConfigDict) -> list[Rule]:
  t = f = "mask_decoder"
  tl, fl = f"{t}.transformer.layers.{{i}}", f"{f}/transformer/layers_{{i}}"
  block = [*_attention(f"{tl}.self_attn", f"{fl}/self_attn"),
           *_attention(f"{tl}.cross_attn_token_to_image", f"{fl}/cross_attn_token_to_image"),
           *_attention(f"{tl}.cross_attn_image_to_token", f"{fl}/cross_attn_image_to_token"),
           *_linear(f"{tl}.mlp.lin1", f"{fl}/mlp/lin1"),
           *_linear(f"{tl}.mlp.lin2", f"{fl}/mlp/lin2"),
           *[r for n in range(1, 5) for r in _norm(f"{tl}.layer_norm{n}", f"{fl}/layer_norm{n}")]]
  hyper = _feed_forward(f"{t}.output_hypernetworks_mlps.{{j}}",
                        f"{f}/output_hypernetworks_mlps_{{j}}", 3)
  return [Rule(f"{t}.iou_token.weight", f"{f}/iou_token"),
          Rule(f"{t}.mask_tokens.weight", f"{f}/mask_tokens"),
          *keymap.expand(block, i=dec.num_layers),
          *_attention(f"{t}.transformer.final_attn_token_to_image",
                      f"{f}/transformer/final_attn_token_to_image"),
          *_norm(f"{t}.transformer.layer_norm_final_attn",
                 f"{f}/transformer/layer_norm_final_attn"),
          *_conv(f"{t}.upscale_conv1", f"{f}/upscale_conv1", transform=UPSAMPLE),
          *_norm(f"{t}.upscale_layer_norm", f"{f}/upscale_layer_norm"),
          *_conv(f"{t}.upscale_conv2", f"{f}/upscale_conv2", transform=UPSAMPLE),
          *keymap.expand(hyper, j=dec.num_multimask_outputs + 1),
          *_feed_forward(f"{t}.iou_prediction_head", f"{f}/iou_prediction_head",
                         dec.iou_head_depth)]


def sam_rules(pixel: ml_collections.ConfigDict, *, include_vision: bool | None = None
              ) -> list[Rule]:
  """Rules for `config.model.pixel`; the ViT is included iff image_encoder == 'sam'."""
  if include_vision is None:
    include_vision = pixel.image_encoder == "sam"
  rules = prompt_encoder_rules(pixel.decoder) + mask_decoder_rules(pixel.decoder)
  return (vision_rules(pixel.sam_vit) if include_vision else []) + rules


def hf_sam_config(pixel: ml_collections.ConfigDict):
  """The transformers `SamConfig` of these sizes (for export and for tests).

  The trap this handles: the vision config's `num_pos_feats` sizes the shared Fourier matrix,
  which must be half the *prompt/decoder* width, not anything about the ViT.
  """
  from transformers import SamConfig  # lazy: torch / transformers load only when weights are converted
  vit, dec = pixel.sam_vit, pixel.decoder
  return SamConfig(
      vision_config=dict(
          hidden_size=vit.hidden_size, output_channels=dec.hidden_size,
          num_hidden_layers=vit.num_layers, num_attention_heads=vit.num_heads,
          image_size=vit.image_size, patch_size=vit.patch_size, mlp_dim=vit.mlp_dim,
          window_size=vit.window_size, global_attn_indexes=list(vit.global_attn_indexes),
          layer_norm_eps=vit.layer_norm_eps, qkv_bias=vit.qkv_bias,
          num_pos_feats=dec.hidden_size // 2),
      prompt_encoder_config=dict(
          hidden_size=dec.hidden_size, image_size=vit.image_size, patch_size=vit.patch_size,
          mask_input_channels=dec.mask_input_channels, layer_norm_eps=dec.layer_norm_eps),
      mask_decoder_config=dict(
          hidden_size=dec.hidden_size, mlp_dim=dec.mlp_dim, num_hidden_layers=dec.num_layers,
          num_attention_heads=dec.num_heads,
          attention_downsample_rate=dec.attention_downsample_rate,
          num_multimask_outputs=dec.num_multimask_outputs, iou_head_depth=dec.iou_head_depth,
          iou_head_hidden_dim=dec.iou_head_hidden_dim, layer_norm_eps=dec.layer_norm_eps))


def hf_sam_config_dict(pixel: ml_collections.ConfigDict) -> dict:
  """The config.json of an exported SamModel: every field `SamConfig.to_dict()` has (not only
  those that differ from transformers' defaults, as save_pretrained writes), `architectures`,
  and every other field of the pretrained folder's config.json (`pixel.pretrained_config`)."""
  config = hf_sam_config(pixel)
  config.architectures = ["SamModel"]
  return keymap.keep_original_fields(config.to_dict(), pixel.get("pretrained_config", None))


def write_hf_sam_config(pixel: ml_collections.ConfigDict, folder: str | os.PathLike) -> None:
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(
      json.dumps(hf_sam_config_dict(pixel), indent=2, sort_keys=True) + "\n")


# model.pixel.sam_vit / model.pixel.decoder fields <- HF SamConfig sub-config fields.
_VIT_FIELDS = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
               "num_heads": "num_attention_heads", "image_size": "image_size",
               "patch_size": "patch_size", "mlp_dim": "mlp_dim", "window_size": "window_size",
               "global_attn_indexes": "global_attn_indexes", "layer_norm_eps": "layer_norm_eps",
               "qkv_bias": "qkv_bias"}
_DECODER_FIELDS = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
                   "num_heads": "num_attention_heads", "mlp_dim": "mlp_dim",
                   "attention_downsample_rate": "attention_downsample_rate",
                   "num_multimask_outputs": "num_multimask_outputs",
                   "iou_head_depth": "iou_head_depth", "iou_head_hidden_dim": "iou_head_hidden_dim",
                   "layer_norm_eps": "layer_norm_eps"}
# What the modules implement; a checkpoint asking for something else is refused by name.
_SUPPORTED = {"vision_config": {"hidden_act": "gelu", "use_abs_pos": True, "use_rel_pos": True,
                                "num_channels": 3},
              "prompt_encoder_config": {"hidden_act": "gelu", "num_point_embeddings": 4},
              "mask_decoder_config": {"hidden_act": "relu"}}


def pixel_sizes_from_hf(hf: Mapping, pixel: ml_collections.ConfigDict) -> dict[str, object]:
  """A SamModel config.json dict -> the `model.pixel` architecture fields it fixes, as
  {"decoder.hidden_size": 256, "sam_vit.num_layers": 32, ...}. The ViT's sizes are included
  only when `pixel.image_encoder` is 'sam' (with 'mixed' the folder's ViT is not used).

  transformers fills the fields a config.json omits (save_pretrained writes only those that
  differ from its defaults). Raises ConversionError naming the field when the checkpoint is
  not a SamModel or uses something the modules do not implement.
  """
  from transformers import SamConfig  # lazy: torch / transformers load only when weights are converted
  if hf.get("model_type") != "sam":
    raise ConversionError(f"config.json: model_type={hf.get('model_type')!r}, expected 'sam'")
  try:
    config = SamConfig.from_dict(dict(hf))
  except (TypeError, ValueError) as e:
    raise ConversionError(f"config.json: not a SamConfig: {e}") from None
  subs = {name: getattr(config, name).to_dict() for name in _SUPPORTED}
  for name, wants in _SUPPORTED.items():
    for field, want in wants.items():
      if subs[name].get(field, want) != want:
        raise ConversionError(f"config.json: {name}.{field}={subs[name][field]!r} is not "
                              f"supported (the module implements {want!r})")
  vision, prompt, decoder = (subs[n] for n in _SUPPORTED)
  sam = pixel.image_encoder == "sam"
  width = decoder["hidden_size"]
  agree = [("prompt_encoder_config.hidden_size", prompt["hidden_size"], width),
           ("prompt_encoder_config.layer_norm_eps", prompt["layer_norm_eps"],
            decoder["layer_norm_eps"]),
           ("vision_config.num_pos_feats", 2 * vision["num_pos_feats"], width)]
  if sam:
    agree += [("vision_config.output_channels", vision["output_channels"], width),
              ("prompt_encoder_config.image_size", prompt["image_size"], vision["image_size"]),
              ("prompt_encoder_config.patch_size", prompt["patch_size"], vision["patch_size"])]
  for field, got, want in agree:
    if got != want:
      raise ConversionError(f"config.json: {field} gives {got!r}, but mask_decoder_config / "
                            f"vision_config give {want!r}; they must agree")
  out = {f"decoder.{ours}": decoder[theirs] for ours, theirs in _DECODER_FIELDS.items()}
  out["decoder.mask_input_channels"] = prompt["mask_input_channels"]
  out["sam_vit.image_size"] = prompt["image_size"]  # the frame of the prompt encoder
  if sam:
    out.update({f"sam_vit.{ours}": vision[theirs] for ours, theirs in _VIT_FIELDS.items()})
    out["sam_vit.global_attn_indexes"] = tuple(vision["global_attn_indexes"])
  return out


def read_hf_config(folder: str | os.PathLike, name: str = "model.pixel.pretrained_path") -> str:
  """The text of a pretrained folder's config.json; ConversionError naming `name` if absent."""
  config_file = pathlib.Path(folder) / "config.json"
  if not config_file.is_file():
    raise ConversionError(f"{name}: {str(folder)!r} has no config.json (not a transformers "
                          f"checkpoint folder)")
  return config_file.read_text()


def torch_to_flax(state_dict: Mapping[str, np.ndarray], pixel: ml_collections.ConfigDict, *,
                  expected: Mapping | None = None) -> dict:
  """HF SamModel state dict (numpy) -> {vision_encoder?, prompt_encoder, mask_decoder} params.

  `expected`: unboxed PixelDecoder params (or their ShapeDtypeStructs) to check every tensor's
  shape against.
  Vision tensors are skipped when image_encoder='mixed'; any other unknown key is an error.
  """
  state = dict(state_dict)
  if TIED_PE in state:
    tied = state.pop(TIED_PE)
    if SHARED_PE not in state:
      state[SHARED_PE] = tied
    elif not np.array_equal(np.asarray(tied), np.asarray(state[SHARED_PE])):
      raise keymap.ConversionError(f"{TIED_PE} differs from {SHARED_PE}; they must be tied")
  include_vision = pixel.image_encoder == "sam"
  if not include_vision:
    state = {k: v for k, v in state.items() if not k.startswith("vision_encoder.")}
  rules = sam_rules(pixel, include_vision=include_vision)
  if expected is not None:
    subtrees = {r.flax_path.split("/")[0] for r in rules}
    expected = {k: v for k, v in expected.items() if k in subtrees}
  return keymap.to_flax(state, rules, expected=expected)


def flax_to_torch(params: Mapping, pixel: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The inverse of torch_to_flax (a full SamModel needs image_encoder='sam')."""
  return keymap.to_torch(params, sam_rules(pixel))


def load_hf_sam(folder: str | os.PathLike, pixel: ml_collections.ConfigDict, *,
                expected: Mapping | None = None) -> dict:
  """Reads a local HF SamModel folder (safetensors, single or sharded) into Flax params."""
  return torch_to_flax(keymap.load_safetensors(folder), pixel, expected=expected)


def save_hf_sam(params: Mapping, pixel: ml_collections.ConfigDict,
                folder: str | os.PathLike) -> None:
  """Writes `model.safetensors` + `config.json` that `SamModel.from_pretrained` loads."""
  if pixel.image_encoder != "sam":
    raise ValueError("save_hf_sam: a SamModel needs the SAM ViT; model.pixel.image_encoder is "
                     f"{pixel.image_encoder!r}")
  folder = pathlib.Path(folder)
  keymap.save_safetensors(flax_to_torch(params, pixel), folder)
  write_hf_sam_config(pixel, folder)


def merge_pretrained(params: Mapping, sam_params: Mapping) -> dict:
  """PixelDecoder params with their SAM subtrees replaced by `sam_params` (from load_hf_sam)."""
  unknown = sorted(set(sam_params) - set(params))
  if unknown:
    raise keymap.ConversionError(f"pretrained SAM subtrees {unknown} are not in the PixelDecoder "
                                 f"params (image_encoder mismatch?)")
  return {**params, **sam_params}
