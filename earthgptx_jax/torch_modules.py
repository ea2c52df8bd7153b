"""The project's own modules ported to PyTorch (imports no jax), with the Flax module each
mirrors: same parameter names, torch layouts. torch_model.EarthGPTXTorch assembles them with the
standard parts (transformers, timm).

  * `PromptEncoder`      <- models/prompts.py VisualPromptEncoder (its SAE is the Dinov2Model of
                            prompt_sae/, which is the Flax ViT exactly; Fourier features with the
                            config's fixed Gaussian stored as a buffer)
  * `RegionEncoder`      <- models/regions.py RegionEncoder (RoIAlign as torch `grid_sample`)
  * `BoxHead`            <- models/box_head.py BoxHead (model.box.head)
  * `ContentIntegration` <- models/integration.py ContentIntegration (+ Projector)
  * `PixelDecoder`       <- models/pixel.py PixelDecoder (the [SEG] MLP, the optional dense-map
                            projection, HF SAM parts for the rest)
  * `splice_tokens`, `gather_seg_states` <- models/earthgptx.py / pixel.py, same static-shape math.
"""

from __future__ import annotations

import math

import ml_collections
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.sam import modeling_sam

NUM_PROMPT_TYPES = 3  # batch.py's prompt_type: 0 point, 1 box, 2 free-form


def _large_negative(dtype: torch.dtype) -> float:
  """jax.nn.dot_product_attention's mask value: a fully masked row averages, never NaNs."""
  return -0.7 * torch.finfo(dtype).max


def masked_attention(q, k, v, key_valid=None):
  """q [B, T, N, H], k / v [B, S, N, H], key_valid [B, S] / [B, T, S] bool -> [B, T, N, H]
  (fp32 softmax)."""
  logits = torch.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(q.shape[-1])
  if key_valid is not None:  # [B, S] for every query, or [B, T, S]
    key_valid = key_valid[:, None, None, :] if key_valid.ndim == 2 else key_valid[:, None]
    logits = logits.masked_fill(~key_valid, _large_negative(logits.dtype))
  weights = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)),
                          dim=-1).to(q.dtype)
  return torch.einsum("bnts,bsnh->btnh", weights, v)


class Attention(nn.Module):
  """layers.Attention: queries x [B, T, D] over context [B, S, D'] -> [B, T, D]."""

  def __init__(self, width: int, context_width: int, num_heads: int):
    super().__init__()
    if width % num_heads:
      raise ValueError(f"attention: width {width} is not a multiple of num_heads {num_heads}")
    self.num_heads = num_heads
    self.query = nn.Linear(width, width)
    self.key = nn.Linear(context_width, width)
    self.value = nn.Linear(context_width, width)
    self.out = nn.Linear(width, width)

  def forward(self, x, context, key_valid=None):
    split = lambda y: y.reshape(*y.shape[:2], self.num_heads, -1)  # noqa: E731
    out = masked_attention(split(self.query(x)), split(self.key(context)),
                           split(self.value(context)), key_valid)
    return self.out(out.reshape(*out.shape[:2], -1))


class FeedForward(nn.Module):
  """layers.FeedForward / integration.Projector: Linear -> exact GELU -> Linear."""

  def __init__(self, width: int, hidden: int, out: int | None = None):
    super().__init__()
    self.fc1 = nn.Linear(width, hidden)
    self.fc2 = nn.Linear(hidden, width if out is None else out)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


def fourier_features(coords, gaussian):
  """SAM's random-Fourier encoding: coords [..., 2] in [0, 1] -> [..., 2F]."""
  projected = 2 * math.pi * ((2 * coords.to(gaussian.dtype) - 1) @ gaussian)
  return torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)


class PromptEncoder(nn.Module):
  """prompts.VisualPromptEncoder: (maps [B, P, M, M], geometry [B, P, 4], type [B, P],
  valid [B, P]) -> [B, P, K, D], zeros for absent prompts. `sae` is a 1-channel Dinov2Model."""

  def __init__(self, cfg: ml_collections.ConfigDict, sae: nn.Module):
    super().__init__()
    w, eps = cfg.sae.hidden_size, cfg.layer_norm_eps
    self.cfg = cfg
    self.sae = sae
    self.register_buffer("fourier_gaussian", torch.zeros(2, cfg.fourier_features))
    self.geometry_proj = nn.Linear(2 * cfg.fourier_features, w)
    self.corner_embed = nn.Parameter(torch.zeros(NUM_PROMPT_TYPES, 2, w))
    self.queries = nn.Parameter(torch.zeros(cfg.tokens_per_prompt, w))
    self.type_embed = nn.Parameter(torch.zeros(NUM_PROMPT_TYPES, w))
    self.context_norm = nn.LayerNorm(w, eps=eps)
    self.query_norm = nn.LayerNorm(w, eps=eps)
    self.pool = Attention(w, w, cfg.pool_heads)
    self.pool_ffn_norm = nn.LayerNorm(w, eps=eps)
    self.pool_ffn = FeedForward(w, cfg.pool_mlp_dim)
    self.out_norm = nn.LayerNorm(w, eps=eps)
    self.out = nn.Linear(w, cfg.embed_dim)

  def forward(self, maps, geometry, types, valid):
    b, p, m, _ = maps.shape
    valid = valid.bool()
    maps = torch.where(valid[..., None, None], maps, 0).to(self.queries.dtype)
    geometry = torch.where(valid[..., None], geometry, 0)
    types = types.long().clamp(0, NUM_PROMPT_TYPES - 1).reshape(b * p)
    map_tokens = self.sae(maps.reshape(b * p, 1, m, m)).last_hidden_state  # [B*P, 1 + N, Ds]
    geo = fourier_features(geometry.reshape(b * p, 2, 2), self.fourier_gaussian)
    geo = self.geometry_proj(geo.to(self.queries.dtype)) + self.corner_embed[types]
    context = torch.cat([map_tokens, geo], dim=1)  # [B*P, T + 2, Ds]
    x = self.queries[None] + self.type_embed[types][:, None]  # [B*P, K, Ds]
    x = x + self.pool(self.query_norm(x), self.context_norm(context))
    x = x + self.pool_ffn(self.pool_ffn_norm(x))
    x = self.out(self.out_norm(x)).reshape(b, p, self.cfg.tokens_per_prompt, -1)
    return torch.where(valid[..., None, None], x, 0)


def image_token_cells(view_affine, image_size: int, grid: int):
  """earthgptx.image_token_cells: [B, V, 2, 3] -> [B, V*G*G, 4] (x1, y1, x2, y2) in the
  global view / S."""
  affine = view_affine.float()
  edges = torch.arange(grid + 1, dtype=torch.float32) * (image_size / grid)
  y1, x1 = torch.meshgrid(edges[:-1], edges[:-1], indexing="ij")
  y2, x2 = torch.meshgrid(edges[1:], edges[1:], indexing="ij")
  corners = torch.stack([torch.stack([x1, y1], -1), torch.stack([x2, y2], -1)], -2)
  corners = corners.reshape(grid * grid * 2, 2)  # x fastest; (top-left, bottom-right)
  linear, shift = affine[..., :2], affine[..., 2]
  original = torch.einsum("bvij,bvnj->bvni", torch.linalg.inv(linear),
                          corners[None, None] - shift[:, :, None, :])
  in_global = (torch.einsum("bij,bvnj->bvni", affine[:, 0, :, :2], original)
               + affine[:, 0, None, None, :, 2]) / image_size
  in_global = in_global.reshape(*in_global.shape[:2], grid * grid, 2, 2)
  cells = torch.cat([in_global.amin(-2), in_global.amax(-2)], -1)
  return cells.reshape(affine.shape[0], -1, 4)


def cells_under_boxes(cells, boxes):
  """integration.cells_under_boxes: [B, N, 4], [B, P, 4] -> [B, P, N] bool."""
  c, bx = cells[:, None], boxes[:, :, None]
  return ((c[..., 0] <= bx[..., 2]) & (bx[..., 0] <= c[..., 2])
          & (c[..., 1] <= bx[..., 3]) & (bx[..., 1] <= c[..., 3]))


class ContentIntegration(nn.Module):
  """integration.ContentIntegration: (image [B, N, C_img], image_cells [B, N, 4], image_valid [B, N],
  prompts [B, P, K, D], prompt_boxes [B, P, 4], prompt_valid [B, P], the prompt encoder's
  Fourier Gaussian)
  -> (image_llm [B, N, H], prompt_llm [B, P, K, H])."""

  def __init__(self, cfg: ml_collections.ConfigDict, image_channels: int, llm_width: int):
    super().__init__()
    d, eps, heads = cfg.embed_dim, cfg.layer_norm_eps, cfg.fusion_heads
    self.image_in = nn.Linear(image_channels, d)
    self.image_position = nn.Linear(2 * cfg.fourier_features, d)
    for name in ("image_norm", "prompt_norm", "cross_query_norm", "cross_context_norm",
                 "joint_norm", "final_norm"):
      setattr(self, name, nn.LayerNorm(d, eps=eps))
    self.image_self_attn = Attention(d, d, heads)
    self.prompt_ffn = FeedForward(d, cfg.fusion_mlp_dim)
    self.cross_attn = Attention(d, d, heads)
    self.joint_self_attn = Attention(d, d, heads)
    self.projector = FeedForward(d, llm_width, llm_width)

  def forward(self, image, image_cells, image_valid, prompts, prompt_boxes, prompt_valid,
              gaussian):
    b, n, _ = image.shape
    _, p, k, d = prompts.shape
    image_valid = image_valid.bool()
    token_valid = prompt_valid.bool().repeat_interleave(k, dim=1)  # [B, P*K]
    img = self.image_in(torch.where(image_valid[..., None], image, 0))
    centres = torch.where(image_valid[..., None], (image_cells[..., :2] + image_cells[..., 2:]) / 2,
                          0.5)
    img = img + self.image_position(fourier_features(centres, gaussian).to(img.dtype))
    prm = torch.where(token_valid[..., None], prompts.reshape(b, p * k, d), 0)
    h = self.image_norm(img)
    img = img + self.image_self_attn(h, h, image_valid)
    prm = prm + self.prompt_ffn(self.prompt_norm(prm))
    under = cells_under_boxes(image_cells, prompt_boxes).repeat_interleave(k, dim=1)
    prm = prm + self.cross_attn(self.cross_query_norm(prm), self.cross_context_norm(img),
                                under & image_valid[:, None])
    x = torch.cat([img, prm], dim=1)
    valid = torch.cat([image_valid, token_valid], dim=1)
    h = self.joint_norm(x)
    x = x + self.joint_self_attn(h, h, valid)
    x = torch.where(valid[..., None], self.projector(self.final_norm(x)), 0)
    return x[:, :n], x[:, n:].reshape(b, p, k, -1)


class SamParts(nn.Module):
  """The HF SamModel submodules the [SEG] path uses, under SamModel's own key names."""

  def __init__(self, sam_config, with_vision: bool):
    super().__init__()
    sam_config.mask_decoder_config._attn_implementation = "eager"
    self.shared_image_embedding = modeling_sam.SamPositionalEmbedding(sam_config.vision_config)
    self.vision_encoder = (modeling_sam.SamVisionEncoder(sam_config.vision_config)
                           if with_vision else None)
    self.prompt_encoder = modeling_sam.SamPromptEncoder(sam_config)
    self.prompt_encoder.shared_embedding = self.shared_image_embedding  # tied, as in SamModel
    self.mask_decoder = modeling_sam.SamMaskDecoder(sam_config.mask_decoder_config)

  def image_positional_embedding(self, h: int, w: int):
    """Fourier encoding of the h x w grid's cell centres: [1, C, h, w]."""
    dtype = self.shared_image_embedding.positional_embedding.dtype
    y = (torch.arange(h, dtype=dtype) + 0.5) / h
    x = (torch.arange(w, dtype=dtype) + 0.5) / w
    grid = torch.stack(torch.broadcast_tensors(x[None, :], y[:, None]), dim=-1)
    return self.shared_image_embedding(grid).permute(2, 0, 1)[None]


def resize(x, size: int, antialias: bool):
  """NCHW bilinear resize, half-pixel centres (jax.image.resize 'linear')."""
  if x.shape[-2:] == (size, size):
    return x
  return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                       antialias=antialias)


def normalise(x, mean, std):
  """[N, S, S, 3] in [0, 1] -> NCHW normalised with the encoder's pretraining mean / std."""
  mean, std = torch.tensor(mean, dtype=x.dtype), torch.tensor(std, dtype=x.dtype)
  return ((x - mean) / std).permute(0, 3, 1, 2)

class PixelDecoder(nn.Module):
  """pixel.PixelDecoder: [SEG] states [B, Q, H] + image -> (masks [B, Q, S, S], iou [B, Q])."""

  def __init__(self, cfg: ml_collections.ConfigDict, llm_width: int, dense_channels: int,
               sam_config):
    super().__init__()
    c = cfg.decoder.hidden_size
    self.cfg = cfg
    if cfg.image_encoder not in ("sam", "mixed"):
      raise ValueError(f"model.pixel.image_encoder: unknown value {cfg.image_encoder!r}")
    self.sam = SamParts(sam_config, with_vision=cfg.image_encoder == "sam")
    self.seg_fc1 = nn.Linear(llm_width, llm_width)
    self.seg_fc2 = nn.Linear(llm_width, c)
    if cfg.image_encoder == "mixed":
      self.dense_proj = nn.Linear(dense_channels, c)
      self.dense_norm = nn.LayerNorm(c, eps=cfg.decoder.layer_norm_eps)

  def forward(self, seg_states, global_view, dense, out_size: int):
    """global_view [B, S, S, 3] in [0, 1]; dense [B, h, w, C_d] (the mixed encoders' map)."""
    cfg = self.cfg
    if cfg.image_encoder == "sam":
      x = normalise(global_view.to(self.seg_fc1.weight.dtype), cfg.sam_vit.pixel_mean,
                     cfg.sam_vit.pixel_std)
      x = resize(x, cfg.sam_vit.image_size, antialias=True)
      embeddings = self.sam.vision_encoder(x).last_hidden_state  # [B, C, h, w]
    else:
      embeddings = self.dense_norm(self.dense_proj(dense)).permute(0, 3, 1, 2)
    b, _, h, w = embeddings.shape
    q = seg_states.shape[1]
    sparse = self.seg_fc2(torch.relu(self.seg_fc1(seg_states)))[:, :, None]  # [B, Q, 1, C]
    dense_prompt = self.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
        b, -1, h, w)
    image_pe = self.sam.image_positional_embedding(h, w).expand(b, -1, -1, -1)
    masks, iou = self.sam.mask_decoder(embeddings, image_pe, sparse, dense_prompt,
                                       multimask_output=False)
    masks = resize(masks[:, :, 0], out_size, antialias=False)
    return masks.reshape(b, q, out_size, out_size), iou[:, :, 0]


def splice_tokens(text_embeds, input_ids, vp_token_index, image_embeds, prompt_embeds,
                  image_patch_id: int):
  """earthgptx.splice_tokens: image / prompt tokens at their placeholders; [B, L, H]."""
  b, n, h = image_embeds.shape
  is_image = input_ids == image_patch_id
  slot = (torch.cumsum(is_image.long(), dim=1) - 1).clamp(0, n - 1)
  image_at = torch.gather(image_embeds, 1, slot[..., None].expand(-1, -1, h))
  flat = prompt_embeds.reshape(b, -1, h)
  index = vp_token_index.long().clamp(0, flat.shape[1] - 1)
  prompt_at = torch.gather(flat, 1, index[..., None].expand(-1, -1, h))
  x = torch.where(is_image[..., None], image_at.to(text_embeds.dtype), text_embeds)
  return torch.where((vp_token_index >= 0)[..., None], prompt_at.to(text_embeds.dtype), x)


def gather_seg_states(hidden, ids, seg_token_id: int, max_seg: int):
  """pixel.gather_seg_states: states at the first Q [SEG] positions -> ([B, Q, H], [B, Q])."""
  is_seg = ids == seg_token_id
  slot = torch.where(is_seg, torch.cumsum(is_seg.long(), dim=1) - 1, max_seg)
  onehot = F.one_hot(slot.clamp(0, max_seg), max_seg + 1)[..., :max_seg]  # [B, L, Q]
  positions = torch.einsum("blq,l->bq", onehot, torch.arange(ids.shape[1]))
  valid = onehot.sum(dim=1) > 0
  states = torch.gather(hidden, 1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
  return torch.where(valid[..., None], states, 0), valid


def region_in_features(cfg: ml_collections.ConfigDict) -> int:
  """Width of the flattened RoIAlign samples: bins^2 x the channels of every source map."""
  channels = {"pixels": 3, **{f"convnext_{i}": d for i, d in enumerate(cfg.vision.convnext.dims)}}
  return cfg.prompt.region.bins ** 2 * sum(channels[name] for name in cfg.prompt.region.sources)


class RegionEncoder(nn.Module):
  """regions.RegionEncoder: (global-view maps NCHW, geometry [B, P, 4], valid [B, P])
  -> [B, P, H_llm]. RoIAlign is `grid_sample` at the bin centres (bilinear, border,
  align_corners=False), a reference independent of the JAX gather."""

  def __init__(self, cfg: ml_collections.ConfigDict):
    super().__init__()
    region = self.region = cfg.prompt.region
    width = region_in_features(cfg)
    self.norm = nn.LayerNorm(width, eps=cfg.prompt.layer_norm_eps)
    self.fc1 = nn.Linear(width, region.mlp_dim)
    if region.box_features:
      self.box_proj = nn.Linear(4, region.mlp_dim)
    self.fc2 = nn.Linear(region.mlp_dim, cfg.llm.hidden_size)

  def sample_grid(self, boxes):
    """boxes [B, P, 4] in [0, 1] -> grid_sample's [B, P * bins, bins, 2] in [-1, 1]."""
    bins = self.region.bins
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2
    half = torch.clamp(boxes[..., 2:] - boxes[..., :2], min=self.region.min_size) / 2
    offsets = (torch.arange(bins, dtype=boxes.dtype) + 0.5) / bins * 2 - 1
    x = centre[..., None, None, 0] + offsets[None, :] * half[..., None, None, 0]
    y = centre[..., None, None, 1] + offsets[:, None] * half[..., None, None, 1]
    x, y = torch.broadcast_tensors(x, y)  # [B, P, bins (y), bins (x)]
    grid = torch.stack([x, y], dim=-1) * 2 - 1
    return grid.reshape(boxes.shape[0], -1, bins, 2)

  def forward(self, maps, geometry, valid):
    b, p = geometry.shape[:2]
    valid = valid.bool()
    boxes = torch.where(valid[..., None], geometry, 0).float()
    grid = self.sample_grid(boxes)
    sampled = []
    for fmap in maps:
      out = F.grid_sample(fmap.float(), grid, mode="bilinear", padding_mode="border",
                          align_corners=False)  # [B, C, P * bins, bins]
      out = out.reshape(b, -1, p, self.region.bins, self.region.bins).permute(0, 2, 3, 4, 1)
      sampled.append(out.reshape(b, p, -1).to(self.fc1.weight.dtype))
    x = self.fc1(self.norm(torch.cat(sampled, dim=-1)))
    if self.region.box_features:
      sides = torch.sqrt(torch.clamp(boxes[..., 2:] - boxes[..., :2], min=0))
      box = torch.cat([boxes[..., :2] + boxes[..., 2:] - 1, sides], dim=-1)
      x = x + self.box_proj(box.to(self.box_proj.weight.dtype))
    x = self.fc2(F.gelu(x))
    return torch.where(valid[..., None], x, 0)


def centre_cells(boxes, h: int, w: int):
  """box_head.centre_cells: [..., 4] boxes in [0, 1] -> [...] index (row * w + col) of the
  h x w cell holding each centre."""
  centre = (boxes[..., :2] + boxes[..., 2:]).float() / 2
  col = (centre[..., 0] * w).floor().clamp(0, w - 1).long()
  row = (centre[..., 1] * h).floor().clamp(0, h - 1).long()
  return row * w + col


class BoxHead(nn.Module):
  """box_head.BoxHead: ([BOX] states [B, Qb, H], valid [B, Qb], global-view map NCHW of side
  `side`, optional target boxes [B, Qb, 4] and their valid [B, Qb]) -> (boxes [B, Qb, 4] in
  [0, 1] (zeros at invalid slots), cell logits [B, Qb, h, w])."""

  def __init__(self, cfg: ml_collections.ConfigDict, side: int):
    super().__init__()
    box, vision = cfg.box, cfg.vision
    self.dim = box.dim
    channels = vision.convnext.dims[box.feature_stage]
    self.query_norm = nn.LayerNorm(cfg.llm.hidden_size, eps=box.layer_norm_eps)
    self.query = nn.Linear(cfg.llm.hidden_size, box.dim)
    self.feature_norm = nn.LayerNorm(channels, eps=box.layer_norm_eps)
    self.key = nn.Linear(channels, box.dim)
    self.value = nn.Linear(channels, box.dim)
    self.position = nn.Parameter(torch.zeros(side * side, box.dim))
    self.fc1 = nn.Linear(2 * box.dim, box.dim)
    self.fc2 = nn.Linear(box.dim, 4)

  def forward(self, states, valid, features, targets=None, target_valid=None):
    _, _, h, w = features.shape
    query = self.query(self.query_norm(states))
    cells = self.feature_norm(features.flatten(2).transpose(1, 2))  # [B, h*w, C]
    keys = self.key(cells) + self.position
    logits = query @ keys.transpose(1, 2) / math.sqrt(self.dim)  # [B, Qb, h*w]
    cell = logits.argmax(-1)
    if targets is not None:
      cell = torch.where(target_valid.bool(), centre_cells(targets, h, w), cell)
    values = self.value(cells)
    picked = torch.gather(values, 1, cell[..., None].expand(-1, -1, values.shape[-1]))
    x = self.fc2(F.gelu(self.fc1(torch.cat([picked, query], dim=-1))))
    corner = torch.stack([cell % w, cell // w], dim=-1).to(x.dtype)
    centre = (corner + torch.sigmoid(x[..., :2])) / torch.tensor([w, h], dtype=x.dtype)
    half = torch.sigmoid(x[..., 2:]) / 2
    boxes = torch.cat([centre - half, centre + half], dim=-1).clamp(0.0, 1.0)
    boxes = torch.where(valid[..., None], boxes, torch.zeros((), dtype=boxes.dtype))
    return boxes, logits.unflatten(-1, (h, w))

