"""Throughput accounting: model FLOPs from the config (MFU), FLOPs counted by XLA (HFU), a
measured matmul peak."""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
import time

import jax
import jax.numpy as jnp

from earthgptx_jax.models import convnext as convnext_lib
from earthgptx_jax.models import vision


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled (or lowered) jit function as XLA counts them (None if
  unknown): of one device's program once compiled for a mesh, of the whole computation when
  lowered; a `scan` body counts once and custom calls (cuDNN attention) count 0."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


def measured_matmul_peak(size: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
  """FLOP/s of a square matmul on the default backend, summed over all local devices.

  Used as the MFU denominator where no vendor peak is configured (CPU): it is what this
  machine's BLAS reaches, so MFU reads as "fraction of the achievable GEMM rate".
  """
  x = jnp.ones((size, size), dtype)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    times.append(time.perf_counter() - t0)
  times.sort()
  per_device = 2 * size**3 / times[len(times) // 2]
  # Host devices of one CPU share its cores: count the CPU once.
  devices = 1 if jax.default_backend() == "cpu" else jax.local_device_count()
  return per_device * devices * jax.process_count()


def interleaved_median(fns, repeats: int) -> list[float]:
  """Median seconds per call of each (already warmed-up) fn; the calls alternate, so every fn
  sees the same machine load. fns block until their result is ready."""
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, t in zip(fns, times):
      start = time.perf_counter()
      fn()
      t.append(time.perf_counter() - start)
  return [statistics.median(t) for t in times]


# ----------------------------------------------------------------------------------------------
# Model FLOPs, counted from the config and the batch shapes (the MFU numerator).
#
# XLA's cost analysis cannot be the numerator: it counts a `scan` body once (a scanned LLM's
# layers count as one), a compiled SPMD program's count is per device, custom calls (cuDNN
# attention) count 0, and remat's recomputation is in it. As MaxText and PaLM do, the model
# FLOPs of a training step are 2 FLOPs per multiply-add of every matmul in the forward pass
# (weights x positions, plus attention's QK^T and AV over the full, padded sequence), times 3
# for the backward (input gradients + weight gradients); here per op, so frozen groups
# (`train.frozen_patterns`) count what they cost once trainable leaves are the only ones
# differentiated: no weight gradient for a frozen weight, and no backward at all through a
# component when nothing in it or upstream of it trains. Elementwise work (norms, activations,
# softmax, the loss, the optimizer) and resizes are left out, as in MaxText; LoRA's rank-r
# adapters too. tests/test_flops.py checks the sum against XLA's count of the unrolled step.

@dataclasses.dataclass(frozen=True)
class MatmulOp:
  """One matmul of the forward pass: `flops` for the whole batch; `weight` = the param path
  ('/'-joined, unrolled layers as layers_<i>) of its weight, None for activation x activation
  (attention scores and values)."""
  weight: str | None
  flops: float


@dataclasses.dataclass(frozen=True)
class Component:
  name: str
  prefix: str  # param path prefix of the component
  upstream: tuple[str, ...]  # components whose outputs feed this one
  ops: tuple[MatmulOp, ...]


class _Ops:
  """Collects MatmulOps under a path prefix; `dense(path, positions, d_in, d_out)`."""

  def __init__(self, prefix: str):
    self.prefix, self.ops = prefix, []

  def dense(self, path: str, positions: float, d_in: float, d_out: float):
    self.ops.append(MatmulOp(f"{self.prefix}{path}", 2.0 * positions * d_in * d_out))

  def attend(self, flops: float):
    self.ops.append(MatmulOp(None, float(flops)))

  def attention(self, queries: float, keys: float, width: float, groups: float):
    """QK^T and AV: 2 matmuls of 2 * queries * keys * width FLOPs in each of `groups`."""
    self.attend(4.0 * groups * queries * keys * width)


def _vit_ops(ops: _Ops, cfg, side: int, images: float, layers: int | None = None):
  """models/vit.py: patch conv + pre-norm blocks over grid**2 + 1 + registers tokens."""
  grid = side // cfg.patch_size
  tokens = grid * grid + 1 + cfg.num_register_tokens
  d = cfg.hidden_size
  hidden = int(cfg.hidden_size * cfg.mlp_ratio)
  ops.dense("patch_embed", images * grid * grid, cfg.patch_size ** 2 * cfg.in_channels, d)
  for i in range(cfg.num_layers if layers is None else layers):
    n = images * tokens
    for name in ("query", "key", "value", "out"):
      ops.dense(f"layers_{i}/{name}", n, d, d)
    ops.attention(tokens, tokens, d, images)
    if cfg.use_swiglu_ffn:
      swiglu = (int(hidden * 2 / 3) + 7) // 8 * 8
      ops.dense(f"layers_{i}/weights_in", n, d, 2 * swiglu)
      ops.dense(f"layers_{i}/weights_out", n, swiglu, d)
    else:
      ops.dense(f"layers_{i}/fc1", n, d, hidden)
      ops.dense(f"layers_{i}/fc2", n, hidden, d)
  return tokens


def _convnext_ops(ops: _Ops, cfg, side: int, images: float):
  """models/convnext.py: stem, per stage a 2x2 downsample conv (where the stage downsamples)
  and blocks (7x7 depthwise conv, fc1, fc2), each at that stage's resolution."""
  if cfg.stem_type == "patch":
    p = cfg.patch_size
    ops.dense("stem_conv", images * (side // p) ** 2, p * p * cfg.in_channels, cfg.dims[0])
  else:
    mid = convnext_lib.stem_mid_channels(cfg)
    ops.dense("stem_conv", images * (side // 2) ** 2, 9 * cfg.in_channels, mid)
    ops.dense("stem_conv2", images * (side // 4) ** 2, 9 * mid, cfg.dims[0])
  strides = convnext_lib.stage_strides(cfg)
  for i, (depth, dim) in enumerate(zip(cfg.depths, cfg.dims)):
    cells = images * (side // convnext_lib.total_stride(cfg, i)) ** 2
    if strides[i] > 1:
      ops.dense(f"stages_{i}_downsample_conv", cells, 4 * cfg.dims[max(i - 1, 0)], dim)
    for j in range(depth):
      block = f"stages_{i}_blocks_{j}"
      ops.dense(f"{block}/conv_dw", cells, cfg.kernel_size ** 2, dim)  # one input per group
      ops.dense(f"{block}/fc1", cells, dim, int(cfg.mlp_ratio * dim))
      ops.dense(f"{block}/fc2", cells, int(cfg.mlp_ratio * dim), dim)


def _attention_ops(ops: _Ops, path: str, queries, keys, d_q, d_kv, width, groups, names):
  """Projections (q from d_q, k/v from d_kv, to `width`; out back to d_q) + attention."""
  q, k, v, o = names
  ops.dense(f"{path}/{q}", groups * queries, d_q, width)
  ops.dense(f"{path}/{k}", groups * keys, d_kv, width)
  ops.dense(f"{path}/{v}", groups * keys, d_kv, width)
  ops.attention(queries, keys, width, groups)
  ops.dense(f"{path}/{o}", groups * queries, width, d_q)


def _sam_vit_ops(ops: _Ops, cfg, images: float, out_channels: int):
  """models/sam_vit.py: windowed / global blocks with decomposed relative-position biases."""
  grid = cfg.image_size // cfg.patch_size
  d, heads = cfg.hidden_size, cfg.num_heads
  ops.dense("patch_embed", images * grid * grid, cfg.patch_size ** 2 * 3, d)
  for i in range(cfg.num_layers):
    if i in set(cfg.global_attn_indexes) or not cfg.window_size:
      side, windows = grid, 1
    else:  # the grid is zero-padded up to whole windows
      side, windows = cfg.window_size, math.ceil(grid / cfg.window_size) ** 2
    n = images * windows * side * side
    ops.dense(f"layers_{i}/attn/qkv", n, d, 3 * d)
    ops.attention(side * side, side * side, d, images * windows)
    ops.attend(2 * 2.0 * n * side * d)  # rel-pos bias: einsum of q with the h and w tables
    ops.dense(f"layers_{i}/attn/proj", n, d, d)
    ops.dense(f"layers_{i}/mlp/lin1", images * grid * grid, d, cfg.mlp_dim)
    ops.dense(f"layers_{i}/mlp/lin2", images * grid * grid, cfg.mlp_dim, d)
  del heads
  ops.dense("neck_conv1", images * grid * grid, d, out_channels)
  ops.dense("neck_conv2", images * grid * grid, 9 * out_channels, out_channels)
  return grid


def _mask_decoder_ops(ops: _Ops, cfg, groups: float, hw: int):
  """models/mask_decoder.py for `groups` prompt groups of 1 sparse token over hw image cells."""
  c, rate = cfg.hidden_size, cfg.attention_downsample_rate
  masks = cfg.num_multimask_outputs + 1
  t = 1 + masks + 1  # iou token, mask tokens, the [SEG] prompt
  names = ("q_proj", "k_proj", "v_proj", "out_proj")
  for i in range(cfg.num_layers):
    path = f"transformer/layers_{i}"
    _attention_ops(ops, f"{path}/self_attn", t, t, c, c, c, groups, names)
    _attention_ops(ops, f"{path}/cross_attn_token_to_image", t, hw, c, c, c // rate, groups, names)
    ops.dense(f"{path}/mlp/lin1", groups * t, c, cfg.mlp_dim)
    ops.dense(f"{path}/mlp/lin2", groups * t, cfg.mlp_dim, c)
    _attention_ops(ops, f"{path}/cross_attn_image_to_token", hw, t, c, c, c // rate, groups, names)
  _attention_ops(ops, "transformer/final_attn_token_to_image", t, hw, c, c, c // rate, groups,
                 names)
  ops.dense("upscale_conv1", groups * hw, c, 4 * (c // 4))
  ops.dense("upscale_conv2", groups * 4 * hw, c // 4, 4 * (c // 8))
  for i in range(masks):
    mlp = f"output_hypernetworks_mlps_{i}"
    ops.dense(f"{mlp}/proj_in", groups, c, c)
    ops.dense(f"{mlp}/layers_0", groups, c, c)
    ops.dense(f"{mlp}/proj_out", groups, c, c // 8)
  hidden = cfg.iou_head_hidden_dim
  ops.dense("iou_prediction_head/proj_in", groups, c, hidden)
  for i in range(cfg.iou_head_depth - 2):
    ops.dense(f"iou_prediction_head/layers_{i}", groups, hidden, hidden)
  ops.dense("iou_prediction_head/proj_out", groups, hidden, masks)
  ops.attend(2.0 * groups * 16 * hw * (c // 8))  # hypernetwork x upscaled map: one mask


def model_components(config, batch_size: int) -> list[Component]:
  """Every matmul of EarthGPTX's forward pass for `batch_size` examples, by component."""
  m = config.model
  b = float(batch_size)
  v = 1 + m.vision.max_tiles
  s, g = m.vision.image_size, m.vision.token_grid
  p, k = m.prompt.max_prompts, m.prompt.tokens_per_prompt
  h_llm, seq = m.llm.hidden_size, int(config.data.max_length)
  parts = []

  def component(name, prefix, upstream, build):
    ops = _Ops(prefix)
    build(ops)
    parts.append(Component(name, prefix, upstream, tuple(ops.ops)))

  component("convnext", "params/vision/convnext/", (),
            lambda o: _convnext_ops(o, m.vision.convnext, s, b * v))
  dino_layers = m.vision.dino_layer
  if dino_layers is not None and dino_layers < 0:
    dino_layers += m.vision.dino.num_layers + 1
  component("dino", "params/vision/dino/", (),
            lambda o: _vit_ops(o, m.vision.dino, s, b * v, dino_layers))

  def prompt_encoder(o):
    cfg, width = m.prompt, m.prompt.sae.hidden_size
    sub = _Ops(o.prefix + "sae/")
    tokens = _vit_ops(sub, cfg.sae, cfg.map_size, b * p) + 2  # + two corner tokens
    o.ops.extend(sub.ops)
    o.dense("geometry_proj", b * p * 2, 2 * cfg.fourier_features, width)
    _attention_ops(o, "pool", k, tokens, width, width, width, b * p,
                   ("query", "key", "value", "out"))
    o.dense("pool_ffn/fc1", b * p * k, width, cfg.pool_mlp_dim)
    o.dense("pool_ffn/fc2", b * p * k, cfg.pool_mlp_dim, width)
    o.dense("out", b * p * k, width, cfg.embed_dim)
  component("sae", "params/prompt_encoder/", (), prompt_encoder)

  if m.prompt.region.sources:
    def region(o):
      channels = sum(3 if name == "pixels" else m.vision.convnext.dims[int(name.split("_")[1])]
                     for name in m.prompt.region.sources)
      o.dense("fc1", b * p, m.prompt.region.bins ** 2 * channels, m.prompt.region.mlp_dim)
      o.dense("fc2", b * p, m.prompt.region.mlp_dim, h_llm)
    component("region", "params/region_encoder/", ("convnext",), region)

  def integration(o):
    cfg, d = m.prompt, m.prompt.embed_dim
    n, pk = v * g * g, p * k
    c_img = m.vision.convnext.dims[m.vision.convnext_stage] + m.vision.dino.hidden_size
    names = ("query", "key", "value", "out")
    o.dense("image_in", b * n, c_img, d)
    o.dense("image_position", b * n, 2 * cfg.fourier_features, d)
    _attention_ops(o, "image_self_attn", n, n, d, d, d, b, names)
    o.dense("prompt_ffn/fc1", b * pk, d, cfg.fusion_mlp_dim)
    o.dense("prompt_ffn/fc2", b * pk, cfg.fusion_mlp_dim, d)
    _attention_ops(o, "cross_attn", pk, n, d, d, d, b, names)
    _attention_ops(o, "joint_self_attn", n + pk, n + pk, d, d, d, b, names)
    o.dense("projector/fc1", b * (n + pk), d, h_llm)
    o.dense("projector/fc2", b * (n + pk), h_llm, h_llm)
  component("integration", "params/integration/", ("convnext", "dino", "sae"), integration)

  def llm(o):
    cfg = m.llm
    tokens = b * seq
    q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    for i in range(cfg.num_layers):
      layer = f"layers_{i}"
      o.dense(f"{layer}/self_attn/q_proj", tokens, h_llm, q_width)
      o.dense(f"{layer}/self_attn/k_proj", tokens, h_llm, kv_width)
      o.dense(f"{layer}/self_attn/v_proj", tokens, h_llm, kv_width)
      o.attention(seq, seq, q_width, b)  # the full (masked) square, as XLA computes it
      o.dense(f"{layer}/self_attn/o_proj", tokens, q_width, h_llm)
      for name in ("gate_proj", "up_proj"):
        o.dense(f"{layer}/mlp/{name}", tokens, h_llm, cfg.intermediate_size)
      o.dense(f"{layer}/mlp/down_proj", tokens, cfg.intermediate_size, h_llm)
    head = "embed_tokens/embedding" if cfg.tie_word_embeddings else "lm_head"
    o.dense(head, tokens, h_llm, cfg.vocab_size)
  component("llm", "params/llm/", ("integration", "region"), llm)

  pix, q = m.pixel, m.pixel.max_seg
  c = pix.decoder.hidden_size
  if pix.image_encoder == "sam":
    grid = pix.sam_vit.image_size // pix.sam_vit.patch_size
    component("sam_vit", "params/pixel/vision_encoder/", (),
              lambda o: _sam_vit_ops(o, pix.sam_vit, b, c))
    image_source, hw = ("sam_vit",), grid * grid
  else:
    dh, dw, dc = vision.dense_shape(m.vision)
    component("dense_proj", "params/pixel/dense_proj/", ("convnext", "dino"),
              lambda o: o.dense("", b * dh * dw, dc, c))
    image_source, hw = ("dense_proj", "convnext", "dino"), dh * dw

  def mask_decoder(o):
    o.dense("seg_fc1", b * q, h_llm, h_llm)
    o.dense("seg_fc2", b * q, h_llm, c)
    sub = _Ops(o.prefix + "mask_decoder/")
    _mask_decoder_ops(sub, pix.decoder, b * q, hw)
    o.ops.extend(sub.ops)
  component("mask_decoder", "params/pixel/", ("llm",) + image_source, mask_decoder)

  if m.box.head:
    def box(o):
      cfg, qb = m.box, m.box.max_boxes
      cells = (s // convnext_lib.total_stride(m.vision.convnext, cfg.feature_stage)) ** 2
      channels = m.vision.convnext.dims[cfg.feature_stage]
      o.dense("query", b * qb, h_llm, cfg.dim)
      o.dense("key", b * cells, channels, cfg.dim)
      o.dense("value", b * cells, channels, cfg.dim)
      o.attend(2.0 * b * qb * cells * cfg.dim)  # cell logits
      o.dense("fc1", b * qb, 2 * cfg.dim, cfg.dim)
      o.dense("fc2", b * qb, cfg.dim, 4)
    component("box_head", "params/box_head/", ("llm", "convnext"), box)
  return parts


def _frozen(path: str, patterns) -> bool:
  return any(re.search(p, path) for p in patterns)


def training_flops(config, batch_size: int | None = None, *, frozen_patterns=None,
                   forward_only: bool = False) -> dict[str, float]:
  """Model FLOPs of one training step (forward + backward) per component, and "total".

  Per forward matmul F: F, plus F for its input gradient when anything in its component or
  upstream trains, plus F for its weight gradient when the weight trains (attention: 2F in the
  backward). `frozen_patterns` defaults to config.train.frozen_patterns; `batch_size` to
  config.train.batch_size (the global batch: divide by the devices' summed peak).
  """
  batch_size = int(config.train.batch_size if batch_size is None else batch_size)
  patterns = tuple(config.train.get("frozen_patterns", ()) if frozen_patterns is None
                   else frozen_patterns)
  parts = model_components(config, batch_size)
  trains = {c.name: any(op.weight and not _frozen(op.weight, patterns) for op in c.ops)
            for c in parts}
  upstream = {c.name: c.upstream for c in parts}

  def backward_reaches(name, seen=()):
    return trains.get(name, False) or any(
        backward_reaches(u, seen + (name,)) for u in upstream.get(name, ()) if u not in seen)

  out = {}
  for c in parts:
    grads = not forward_only and backward_reaches(c.name)
    total = 0.0
    for op in c.ops:
      total += op.flops * (1 + grads)
      if op.weight is None:
        total += op.flops * grads  # attention: both operands need gradients
      elif not forward_only and not _frozen(op.weight, patterns):
        total += op.flops
    out[c.name] = total
  out["total"] = sum(out.values())
  return out


def model_flops_per_step(config, batch_size: int | None = None) -> float:
  """The MFU numerator: `training_flops(...)["total"]` (all devices together)."""
  return training_flops(config, batch_size)["total"]
