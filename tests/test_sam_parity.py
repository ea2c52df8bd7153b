"""SAM in Flax vs transformers' SamModel on random shrunk weights; HF folder round trip.

Sizes are shrunk but keep every code path: a 6x6 patch grid with 4x4 windows (so windows
are padded), one global layer, 4 mask tokens, a 3-deep IoU head. mask_input_channels stays at
SAM's 16: with fewer, the first mask LayerNorm normalises 2 channels, a near-sign function that
turns 1e-7 rounding differences into 1e-4 and makes fp32 parity meaningless. The vision config's
`num_pos_feats` is half the prompt width (the trap `hf_sam_config` handles).
"""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import linen as nn

from configs.fusion import get_config
from earthgptx_jax.convert import keymap
from earthgptx_jax.convert import sam as sam_convert
from earthgptx_jax.models import pixel
from earthgptx_jax.models.mask_decoder import SamMaskDecoder, SamPromptEncoder
from earthgptx_jax.models.sam_vit import SamVisionEncoder

RTOL = 1e-5
B, Q, H_LLM = 2, 2, 12


def _pixel_config():
  cfg = get_config("tiny").model.pixel
  cfg.image_encoder = "sam"
  cfg.dtype = "float32"
  cfg.decoder.update(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32, iou_head_hidden_dim=16,
                     mask_input_channels=16, num_multimask_outputs=3, iou_head_depth=3)
  cfg.sam_vit.update(image_size=48, patch_size=8, hidden_size=16, num_layers=2, num_heads=2,
                     mlp_dim=32, window_size=4, global_attn_indexes=(1,))
  return cfg


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return np.abs(got - want).max() / np.abs(want).max()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """A random SamModel saved as a HF folder, and its Flax params read back from that folder."""
  from transformers import SamModel
  cfg = _pixel_config()
  torch.manual_seed(0)
  model = SamModel(sam_convert.hf_sam_config(cfg)).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():  # HF init leaves rel-pos / pos-embed at 0: randomise everything
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "layer_norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      elif "positional_embedding" in name:
        p.copy_(noise)
      else:
        p.copy_(0.3 * noise)
  folder = tmp_path_factory.mktemp("sam_hf")
  model.save_pretrained(folder)
  decoder = pixel.PixelDecoder(cfg)
  shapes = nn.meta.unbox(jax.eval_shape(
      functools.partial(decoder.init, out_size=48), jax.random.key(0), jnp.zeros((B, Q, H_LLM)),
      jnp.ones((B, Q), bool), sam_pixel_values=jnp.zeros((B, 48, 48, 3)))["params"])
  params = sam_convert.load_hf_sam(folder, cfg, expected=shapes)
  return cfg, model, folder, params, shapes


def test_vision_encoder_parity(hf):
  cfg, model, _, params, _ = hf
  x = np.random.default_rng(0).normal(size=(B, 48, 48, 3)).astype(np.float32)
  with torch.no_grad():
    want = model.vision_encoder(torch.from_numpy(x).permute(0, 3, 1, 2)).last_hidden_state
  got = SamVisionEncoder(cfg.sam_vit, cfg.decoder.hidden_size).apply(
      {"params": params["vision_encoder"]}, jnp.asarray(x))
  assert _rel_err(got, want.permute(0, 2, 3, 1).numpy()) <= RTOL


PROMPTS = {
    # name: (points?, boxes?, masks?, multimask). Labels cover 1, 0, -1 and padding -10;
    # points alone take SAM's "pad with a not-a-point" branch, points + boxes do not.
    "points": (True, False, False, True),
    "points_boxes": (True, True, False, False),
    "boxes_mask": (False, True, True, True),
}


@pytest.mark.parametrize("case", list(PROMPTS))
def test_prompt_encoder_and_mask_decoder_parity(hf, case):
  cfg, model, _, params, _ = hf
  use_points, use_boxes, use_masks, multimask = PROMPTS[case]
  rng = np.random.default_rng(zlib.crc32(case.encode()))
  h = w = 6
  emb = rng.normal(size=(B, h, w, 16)).astype(np.float32)
  points = rng.uniform(0, 48, size=(B, Q, 3, 2)).astype(np.float32) if use_points else None
  labels = np.array([[[1, 0, -10], [1, -1, 1]], [[0, 1, 1], [1, -10, -10]]],
                    np.int64) if use_points else None
  x1y1 = rng.uniform(0, 24, size=(B, Q, 2))
  boxes = np.concatenate([x1y1, x1y1 + rng.uniform(4, 24, size=(B, Q, 2))], -1).astype(
      np.float32) if use_boxes else None
  masks = rng.normal(size=(B, 4 * h, 4 * w)).astype(np.float32) if use_masks else None

  t = lambda a: None if a is None else torch.from_numpy(a)
  with torch.no_grad():
    out = model(image_embeddings=torch.from_numpy(emb).permute(0, 3, 1, 2), input_points=t(points),
                input_labels=t(labels), input_boxes=t(boxes),
                input_masks=None if masks is None else t(masks)[:, None], multimask_output=multimask)

  encoder = SamPromptEncoder(cfg.decoder, cfg.sam_vit.image_size)
  pe_vars = {"params": params["prompt_encoder"]}
  j = lambda a: None if a is None else jnp.asarray(a)
  sparse, dense = encoder.apply(pe_vars, embedding_hw=(h, w), points=j(points),
                                labels=j(labels), boxes=j(boxes), masks=j(masks))
  image_pe = encoder.apply(pe_vars, h, w, method="image_positional_embedding")
  got_masks, got_iou = SamMaskDecoder(cfg.decoder).apply(
      {"params": params["mask_decoder"]}, jnp.asarray(emb), image_pe, sparse, dense, multimask)
  assert _rel_err(got_masks, out.pred_masks.numpy()) <= RTOL
  assert _rel_err(got_iou, out.iou_scores.numpy()) <= RTOL


def test_pixel_decoder_matches_lisa_seg_path_in_torch(hf):
  """PixelDecoder (SAM ViT, [SEG] MLP, no_mask dense, single mask, resize) vs the same in torch."""
  cfg, model, _, sam_params, shapes = hf
  rng = np.random.default_rng(3)
  fc1, fc2 = torch.nn.Linear(H_LLM, H_LLM), torch.nn.Linear(H_LLM, 16)
  seg = rng.normal(size=(B, Q, H_LLM)).astype(np.float32)
  view = rng.uniform(size=(B, 48, 48, 3)).astype(np.float32)
  mean, std = np.array(cfg.sam_vit.pixel_mean), np.array(cfg.sam_vit.pixel_std)
  with torch.no_grad():
    x = torch.from_numpy(((view - mean) / std).astype(np.float32)).permute(0, 3, 1, 2)
    emb = model.vision_encoder(x).last_hidden_state
    sparse = fc2(torch.relu(fc1(torch.from_numpy(seg))))[:, :, None]
    dense = model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(B, -1, 6, 6)
    image_pe = model.get_image_wide_positional_embeddings().repeat(B, 1, 1, 1)
    masks, iou = model.mask_decoder(emb, image_pe, sparse, dense, multimask_output=False)
    want = F.interpolate(masks[:, :, 0], (48, 48), mode="bilinear", align_corners=False)

  lin = lambda m: {"kernel": m.weight.detach().numpy().T, "bias": m.bias.detach().numpy()}
  params = sam_convert.merge_pretrained(
      {**jax.tree_util.tree_map(np.zeros_like, shapes), "seg_fc1": lin(fc1), "seg_fc2": lin(fc2)},
      sam_params)
  got, got_iou = pixel.PixelDecoder(cfg).apply({"params": params}, jnp.asarray(seg),
                                               jnp.ones((B, Q), bool),
                                               sam_pixel_values=jnp.asarray(view), out_size=48)
  assert _rel_err(got, want.numpy()) <= RTOL
  assert _rel_err(got_iou, iou[:, :, 0].numpy()) <= RTOL


def test_hf_folder_round_trip_is_bit_exact(hf, tmp_path):
  from transformers import SamModel
  cfg, model, folder, params, _ = hf
  sam_convert.save_hf_sam(params, cfg, tmp_path)
  original = keymap.load_safetensors(folder)
  exported = keymap.load_safetensors(tmp_path)
  assert set(exported) == set(original)
  for k in original:
    assert exported[k].dtype == original[k].dtype and np.array_equal(exported[k], original[k]), k
  reloaded, info = SamModel.from_pretrained(tmp_path, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  # Older exports carry the tied copy too: accepted when equal, rejected when not.
  both = dict(original, **{sam_convert.TIED_PE: original[sam_convert.SHARED_PE]})
  assert keymap.flatten(sam_convert.torch_to_flax(both, cfg)).keys() == keymap.flatten(params).keys()
  both[sam_convert.TIED_PE] = both[sam_convert.TIED_PE] + 1
  with pytest.raises(keymap.ConversionError, match="tied"):
    sam_convert.torch_to_flax(both, cfg)


def test_mixed_mode_skips_vision_and_mismatches_name_the_tensor(hf):
  cfg, _, folder, _, shapes = hf
  mixed = _pixel_config()
  mixed.image_encoder = "mixed"
  params = sam_convert.load_hf_sam(folder, mixed)
  assert set(params) == {"prompt_encoder", "mask_decoder"}
  state = keymap.load_safetensors(folder)
  state[sam_convert.SHARED_PE] = np.zeros((2, 128), np.float32)  # SamVisionConfig default
  with pytest.raises(keymap.ConversionError, match="shared_image_embedding.positional_embedding"):
    sam_convert.torch_to_flax(state, cfg, expected=shapes)
  with pytest.raises(ValueError, match="image_encoder"):
    sam_convert.save_hf_sam(params, mixed, "/nonexistent")
