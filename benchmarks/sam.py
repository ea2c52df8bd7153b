"""SAM forward in Flax vs transformers (PyTorch), same weights, on this machine's CPU.

Times (a) the ViT-B image encoder at 1024 px and (b) prompt encoder + mask decoder for Q point
prompts on one image (single-mask output, as the [SEG] path uses it). Reports the median of
`--repeats` runs after one warm-up (JAX and torch alternating), JAX's compile time separately,
the ratio JAX / torch (target <= 1.0x) and the relative difference of the outputs (a sanity
check, not a test).

  python benchmarks/sam.py                      # ViT-B, 1024 px, batch 1
  python benchmarks/sam.py --image_size=512     # quicker
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from configs.fusion import get_config  # noqa: E402
from earthgptx_jax.convert import sam as sam_convert  # noqa: E402
from earthgptx_jax.models.mask_decoder import SamMaskDecoder, SamPromptEncoder  # noqa: E402
from earthgptx_jax.models.sam_vit import SamVisionEncoder  # noqa: E402


def vit_b_config(image_size: int):
  """config.model.pixel with SAM ViT-B (facebook/sam-vit-base) sizes."""
  cfg = get_config("paper").model.pixel
  cfg.dtype = "float32"
  cfg.sam_vit.update(image_size=image_size, patch_size=16, hidden_size=768, num_layers=12,
                     num_heads=12, mlp_dim=3072, window_size=14, global_attn_indexes=(2, 5, 8, 11))
  return cfg


def timed_pair(jax_fn, torch_fn, repeats: int):
  """Median seconds of each after one warm-up, the two runs alternating so that load from
  other processes on a shared machine hits both alike. Returns (jax_s, torch_s, outputs)."""
  outs = jax_fn(), torch_fn()
  jax_times, torch_times = [], []
  for _ in range(repeats):
    for fn, times in ((jax_fn, jax_times), (torch_fn, torch_times)):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
  return statistics.median(jax_times), statistics.median(torch_times), outs


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def build(image_size: int):
  """(pixel config, HF SamModel with random weights, the same weights as Flax params)."""
  from transformers import SamModel
  cfg = vit_b_config(image_size)
  torch.manual_seed(0)
  model = SamModel(sam_convert.hf_sam_config(cfg)).eval()
  with torch.no_grad():  # HF leaves rel-pos / pos-embed at 0; give every weight some signal
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return cfg, model, jax.device_put(sam_convert.torch_to_flax(state, cfg))


def bench_image_encoder(cfg, model, params, batch: int, repeats: int) -> dict:
  """SAM ViT image encoder, ours vs HF: median seconds, compile seconds, relative error."""
  size, c = cfg.sam_vit.image_size, cfg.decoder.hidden_size
  x = np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32)
  x_t = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  vit = SamVisionEncoder(cfg.sam_vit, c)
  vit_fn = jax.jit(lambda p, x: vit.apply({"params": p}, x))
  start = time.perf_counter()
  vit_compiled = vit_fn.lower(params["vision_encoder"], jnp.asarray(x)).compile()
  compile_s = time.perf_counter() - start
  x_j = jnp.asarray(x)
  with torch.no_grad():
    jax_s, torch_s, (emb_j, emb_t) = timed_pair(
        lambda: vit_compiled(params["vision_encoder"], x_j).block_until_ready(),
        lambda: model.vision_encoder(x_t).last_hidden_state, repeats)
  err = rel_err(emb_j, emb_t.permute(0, 2, 3, 1).numpy())
  return dict(jax=jax_s, torch=torch_s, compile_s=compile_s, err=err)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--image_size", type=int, default=1024)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--num_prompts", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  cfg, model, params = build(args.image_size)
  print(f"devices: jax {jax.devices()[0].platform} x{len(jax.devices())}, "
        f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
  rng = np.random.default_rng(0)
  size, b, c = args.image_size, args.batch, cfg.decoder.hidden_size

  # (a) Image encoder.
  r = bench_image_encoder(cfg, model, params, b, args.repeats)
  print(f"image encoder ViT-B {size}px batch {b}: jax {r['jax'] * 1e3:.0f} ms, torch "
        f"{r['torch'] * 1e3:.0f} ms, ratio {r['jax'] / r['torch']:.2f}x (compile "
        f"{r['compile_s']:.1f} s), rel err {r['err']:.1e}")

  # (b) Prompt encoder + mask decoder, Q point prompts, single mask.
  h = size // 16
  emb = rng.normal(size=(b, h, h, c)).astype(np.float32)
  points = rng.uniform(0, size, size=(b, args.num_prompts, 1, 2)).astype(np.float32)
  labels = np.ones((b, args.num_prompts, 1), np.int64)
  encoder = SamPromptEncoder(cfg.decoder, size)
  decoder = SamMaskDecoder(cfg.decoder)

  def decode(p, emb, points, labels):
    pe = {"params": p["prompt_encoder"]}
    sparse, dense = encoder.apply(pe, embedding_hw=(h, h), points=points, labels=labels)
    image_pe = encoder.apply(pe, h, h, method="image_positional_embedding")
    return decoder.apply({"params": p["mask_decoder"]}, emb, image_pe, sparse, dense, False)

  dec_args = (params, jnp.asarray(emb), jnp.asarray(points), jnp.asarray(labels))
  start = time.perf_counter()
  dec_compiled = jax.jit(decode).lower(*dec_args).compile()
  compile_s = time.perf_counter() - start
  emb_t = torch.from_numpy(emb).permute(0, 3, 1, 2).contiguous()
  points_t, labels_t = torch.from_numpy(points), torch.from_numpy(labels)
  with torch.no_grad():
    jax_s, torch_s, ((masks_j, _), out_t) = timed_pair(
        lambda: jax.block_until_ready(dec_compiled(*dec_args)),
        lambda: model(image_embeddings=emb_t, input_points=points_t, input_labels=labels_t,
                      multimask_output=False), args.repeats)
  err = rel_err(masks_j, out_t.pred_masks.numpy())
  print(f"prompt encoder + mask decoder, {args.num_prompts} prompts on {h}x{h}: jax "
        f"{jax_s * 1e3:.1f} ms, torch {torch_s * 1e3:.1f} ms, ratio {jax_s / torch_s:.2f}x "
        f"(compile {compile_s:.1f} s), rel err {err:.1e}")


if __name__ == "__main__":
  main()
