"""EarthGPT-X in PyTorch: the exported model, assembled from standard parts (imports no jax).

`EarthGPTXTorch.from_pretrained(folder)` loads what `earthgptx_jax.export` writes:

    folder/
      config.json                 the run's config (all sizes, token ids, mean / std)
      llm/                        transformers LlamaForCausalLM          <- models/llama.py Llama
      dino/                       transformers Dinov2(WithRegisters)Model <- models/vit.py ViT (vision.dino)
      convnext/                   timm ConvNeXt trunk (timm / open_clip  <- models/convnext.py ConvNeXt
                                  `trunk.` keys without the prefix) + config.json (timm kwargs)
      prompt_sae/                 transformers Dinov2Model, 1 channel    <- models/vit.py ViT (prompt.sae)
      sam/                        transformers SamModel layout: vision_encoder (image_encoder='sam'),
                                  prompt_encoder, mask_decoder, shared_image_embedding
                                                                         <- models/sam_vit.py, mask_decoder.py
      earthgptx.safetensors       the project's own modules (torch_modules.py)
      tokenizer/                  the run's tokenizer

The project's own modules are ported in torch_modules.py (same parameter names as the Flax
modules, torch layouts); `EarthGPTXTorch.encode_visual` mirrors models/vision.py
MixedVisionEncoder (normalise, resample, concat).

`EarthGPTXTorch.forward(batch)` takes batch.py's fields as torch tensors (channels-last images as
in the contract) and returns (logits [B, L, V], mask_logits [B, Q, S, S], iou [B, Q], boxes
[B, Qb, 4]) with the semantics of `EarthGPTX.__call__` (tests/test_export_torch.py checks fp32
parity).
"""

from __future__ import annotations

import os
import pathlib

import ml_collections
import timm.models.convnext
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from earthgptx_jax import config_io
from earthgptx_jax.torch_modules import (BoxHead, ContentIntegration, PixelDecoder, PromptEncoder,
                                         RegionEncoder, gather_seg_states, image_token_cells,
                                         normalise, resize, splice_tokens)

NEW_MODULES_FILE = "earthgptx.safetensors"
CONVNEXT_DIR, DINO_DIR, LLM_DIR, SAE_DIR, SAM_DIR = "convnext", "dino", "llm", "prompt_sae", "sam"
# Keys of earthgptx.safetensors that are constants of the config, not trained weights.
FOURIER_KEY = "prompt_encoder.fourier_gaussian"


def convnext_kwargs(cfg) -> dict:
  """`model.vision.convnext` -> kwargs of `timm.models.convnext.ConvNeXt` (the trunk)."""
  if cfg.mlp_ratio != 4:
    raise ValueError(f"model.vision.convnext.mlp_ratio={cfg.mlp_ratio}: timm's ConvNeXt fixes 4")
  return dict(in_chans=cfg.in_channels, num_classes=0, depths=tuple(cfg.depths),
              dims=tuple(cfg.dims), kernel_sizes=cfg.kernel_size, patch_size=cfg.patch_size,
              stem_type=cfg.stem_type, ls_init_value=cfg.layer_scale_init, norm_eps=cfg.layer_norm_eps, conv_mlp=False)


class EarthGPTXTorch(nn.Module):
  """models/earthgptx.py EarthGPTX in PyTorch; build with `from_pretrained(folder)`."""

  def __init__(self, config: ml_collections.ConfigDict, *, convnext: nn.Module,
               dino: nn.Module, sae: nn.Module, llm: nn.Module, sam_config):
    super().__init__()
    m = self.model_config = config.model
    self.config = config
    self.convnext = convnext  # timm ConvNeXt            <- vision.convnext
    self.dino = dino  # transformers Dinov2(WithRegisters)Model <- vision.dino
    self.prompt_encoder = PromptEncoder(m.prompt, sae)  # <- prompt_encoder
    if m.prompt.region.sources:
      self.region_encoder = RegionEncoder(m)  # <- region_encoder
    image_channels = m.vision.convnext.dims[m.vision.convnext_stage] + m.vision.dino.hidden_size
    self.integration = ContentIntegration(m.prompt, image_channels, m.llm.hidden_size)
    self.llm = llm  # transformers LlamaForCausalLM       <- llm
    self.pixel = PixelDecoder(m.pixel, m.llm.hidden_size, _dense_channels(m.vision), sam_config)
    if m.box.head:
      reduction = convnext.feature_info[m.box.feature_stage]["reduction"]
      self.box_head = BoxHead(m, m.vision.image_size // reduction)  # <- box_head

  @classmethod
  def from_pretrained(cls, folder: str | os.PathLike) -> EarthGPTXTorch:
    """Loads an exported folder (see the module docstring); float32, eval mode."""
    folder = pathlib.Path(folder)
    missing = [p for p in ("config.json", NEW_MODULES_FILE, LLM_DIR, DINO_DIR, CONVNEXT_DIR,
                           SAE_DIR, SAM_DIR) if not (folder / p).exists()]
    if missing:
      raise FileNotFoundError(f"{folder}: not an EarthGPTXTorch folder, missing {missing}")
    config = config_io.load_config(folder / "config.json")
    m = config.model
    convnext = timm.models.convnext.ConvNeXt(**convnext_kwargs(m.vision.convnext))
    convnext.load_state_dict(load_file(str(folder / CONVNEXT_DIR / "model.safetensors")))
    load = dict(dtype=torch.float32, attn_implementation="eager")
    # Dinov2Model, or Dinov2WithRegistersModel when the config has register tokens.
    dino = transformers.AutoModel.from_pretrained(folder / DINO_DIR, **load)
    sae = transformers.AutoModel.from_pretrained(folder / SAE_DIR, **load)
    llm = transformers.LlamaForCausalLM.from_pretrained(folder / LLM_DIR, **load)
    sam_config = transformers.SamConfig.from_pretrained(folder / SAM_DIR)
    model = cls(config, convnext=convnext, dino=dino, sae=sae, llm=llm, sam_config=sam_config)
    sam_state = load_file(str(folder / SAM_DIR / "model.safetensors"))
    result = model.pixel.sam.load_state_dict(sam_state, strict=False)
    tied = {"prompt_encoder.shared_embedding.positional_embedding"}
    if set(result.missing_keys) - tied or result.unexpected_keys:
      raise ValueError(f"{folder / SAM_DIR}: SAM weights do not fit: missing "
                       f"{sorted(set(result.missing_keys) - tied)[:5]}, unexpected "
                       f"{result.unexpected_keys[:5]}")
    own = load_file(str(folder / NEW_MODULES_FILE))
    expected = set(model.own_state_keys())
    if set(own) != expected:
      raise ValueError(f"{folder / NEW_MODULES_FILE}: keys differ from the model's: missing "
                       f"{sorted(expected - set(own))[:5]}, unexpected "
                       f"{sorted(set(own) - expected)[:5]}")
    model.load_state_dict(own, strict=False)
    return model.float().eval()

  @property
  def dtype(self) -> torch.dtype:
    """The parameters' dtype (float32 from `from_pretrained`); inputs are cast to it."""
    return self.integration.image_in.weight.dtype

  def own_state_keys(self) -> list[str]:
    """State-dict keys of the ported modules (earthgptx.safetensors): all but standard parts."""
    standard = ("convnext.", "dino.", "llm.", "prompt_encoder.sae.", "pixel.sam.")
    return [k for k in self.state_dict() if not k.startswith(standard)]

  def encode_visual(self, batch):
    """-> image tokens [B, N, H], prompt tokens [B, P, K, H], dense map [B, h, w, C_d], the box
    head's global-view map NCHW (None with the head off)."""
    m_cfg = self.model_config
    v_cfg = m_cfg.vision
    pv = batch["pixel_values"].to(self.dtype)
    b, v, s = pv.shape[:3]
    x = pv.reshape(b * v, s, s, 3)
    g = v_cfg.token_grid
    conv = normalise(x, v_cfg.convnext.image_mean, v_cfg.convnext.image_std)
    stages = []
    y = self.convnext.stem(conv)
    for stage in self.convnext.stages:
      y = stage(y)
      stages.append(y)  # NCHW
    dino_in = normalise(x, v_cfg.dino.image_mean, v_cfg.dino.image_std)
    out = self.dino(dino_in, output_hidden_states=v_cfg.dino_layer is not None)
    tokens = (out.last_hidden_state if v_cfg.dino_layer is None
              else out.hidden_states[v_cfg.dino_layer])
    first = 1 + v_cfg.dino.num_register_tokens
    grid = s // v_cfg.dino.patch_size
    dino_map = tokens[:, first:].reshape(b * v, grid, grid, -1).permute(0, 3, 1, 2)
    conv_map = stages[v_cfg.convnext_stage]
    mixed = torch.cat([resize(conv_map, g, True), resize(dino_map, g, True)], dim=1)
    mixed = mixed.permute(0, 2, 3, 1)  # [B*V, G, G, C_mix]
    image_tokens = mixed.reshape(b, v * g * g, -1)
    dense = {"convnext": lambda: stages[v_cfg.dense_stage].permute(0, 2, 3, 1),
             "dino": lambda: dino_map.permute(0, 2, 3, 1), "mixed": lambda: mixed}
    dense = dense[v_cfg.dense_source]()
    dense = dense.reshape(b, v, *dense.shape[1:])[:, 0]
    image_valid = batch["view_valid"].bool().repeat_interleave(g * g, dim=1)
    prompts = self.prompt_encoder(batch["prompt_maps"].to(self.dtype),
                                  batch["prompt_geometry"].to(self.dtype),
                                  batch["prompt_type"], batch["prompt_valid"])
    cells = image_token_cells(batch["view_affine"], s, g)
    image_llm, prompt_llm = self.integration(image_tokens, cells, image_valid, prompts,
                                             batch["prompt_geometry"].float(),
                                             batch["prompt_valid"],
                                             self.prompt_encoder.fourier_gaussian)
    if m_cfg.prompt.region.sources:
      global_maps = {"pixels": pv[:, 0].permute(0, 3, 1, 2),
                     **{f"convnext_{i}": st.reshape(b, v, *st.shape[1:])[:, 0]
                        for i, st in enumerate(stages)}}
      region = self.region_encoder([global_maps[n] for n in m_cfg.prompt.region.sources],
                                   batch["prompt_geometry"].to(self.dtype), batch["prompt_valid"])
      prompt_llm = prompt_llm + region[:, :, None, :]
    box_features = None
    if m_cfg.box.head:
      box_features = stages[m_cfg.box.feature_stage]
      box_features = box_features.reshape(b, v, *box_features.shape[1:])[:, 0]
    return image_llm, prompt_llm, dense, box_features

  def forward(self, batch: dict[str, torch.Tensor], return_box_cell_logits: bool = False):
    """batch.py fields -> (logits [B, L, V], mask_logits [B, Q, S, S], iou [B, Q], boxes
    [B, Qb, 4] (zeros with the box head off)), all in the model's dtype; with
    `return_box_cell_logits` also the box head's cell logits [B, Qb, h, w] (for the
    training loss; None with the head off)."""
    m = self.model_config
    ids = batch["input_ids"].long()
    image_llm, prompt_llm, dense, box_features = self.encode_visual(batch)
    embeds = splice_tokens(self.llm.get_input_embeddings()(ids), ids,
                           batch["vp_token_index"].long(), image_llm, prompt_llm,
                           _token_id(m, "image_patch"))
    mask = batch["attention_mask"].bool()
    positions = (torch.cumsum(mask.long(), dim=1) - 1).clamp(min=0)  # counts real tokens
    hidden = self.llm.model(inputs_embeds=embeds, attention_mask=mask.long(),
                            position_ids=positions).last_hidden_state  # after the final norm
    logits = self.llm.lm_head(hidden)
    states, _ = gather_seg_states(hidden, batch["targets"].long(), _token_id(m, "seg"),
                                  m.pixel.max_seg)
    masks, iou = self.pixel(states, batch["pixel_values"][:, 0], dense,
                            batch["pixel_values"].shape[2])
    boxes = torch.zeros(ids.shape[0], m.box.max_boxes, 4, dtype=hidden.dtype)
    cell_logits = None
    if m.box.head:
      states, valid = gather_seg_states(hidden, batch["targets"].long(), _token_id(m, "box"),
                                        m.box.max_boxes)
      boxes, cell_logits = self.box_head(states, valid, box_features,
                                         batch["box_targets"].to(hidden.dtype),
                                         batch["box_valid"])
    if return_box_cell_logits:
      return logits, masks, iou, boxes, cell_logits
    return logits, masks, iou, boxes


def _token_id(model_config, name: str) -> int:
  value = model_config.token_ids.get(name, None)
  if value is None or value < 0:
    raise ValueError(f"config.json: model.token_ids.{name} is unset ({value!r})")
  return int(value)


def _dense_channels(vision) -> int:
  """C_d of the dense map (vision.dense_shape without jax)."""
  if vision.dense_source == "convnext":
    return vision.convnext.dims[vision.dense_stage]
  if vision.dense_source == "dino":
    return vision.dino.hidden_size
  if vision.dense_source == "mixed":
    return vision.convnext.dims[vision.convnext_stage] + vision.dino.hidden_size
  raise ValueError(f"model.vision.dense_source: unknown value {vision.dense_source!r}")
