"""Forward time of each vision encoder at paper resolution: Flax vs its PyTorch reference.

Same random weights on both sides (converted with `earthgptx_jax.convert.vision`), fp32, the
paper preset's sizes (`configs/fusion.py:paper`): timm `convnext_large` (open_clip
convnext_large_d_320's trunk) and HF `Dinov2Model` ViT-L/14, one S x S view per image.
Reports the median of `--repeats` timed calls (Flax and torch interleaved, so both see the
same load on a shared machine) after one warm-up (JAX compiles there, outside the timing)
and the ratio Flax / torch; the relative error of the outputs is printed too.

  python benchmarks/encoders.py [--batch 1] [--repeats 3] [--encoders convnext,dino]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch

from configs import fusion
from earthgptx_jax import perf
from earthgptx_jax.convert import vision as convert
from earthgptx_jax.models import convnext as convnext_lib
from earthgptx_jax.models import vit as vit_lib


def _time(fns, repeats: int) -> list[float]:
  """Median seconds per call of each fn after one warm-up (compile) call; calls interleaved."""
  for fn in fns:
    fn()
  return perf.interleaved_median(fns, repeats)


def _rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def bench_convnext(cfg, x_nhwc: np.ndarray, repeats: int) -> dict:
  import timm
  model = timm.create_model("convnext_large", depths=cfg.convnext.depths, dims=cfg.convnext.dims,
                            pretrained=False, num_classes=0).eval()
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "trunk.safetensors")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    c, params = convert.load_convnext(path, cfg.convnext)
  c.dtype, c.remat = "float32", False
  forward = jax.jit(lambda p, x: convnext_lib.ConvNeXt(c).apply({"params": p}, x).stages[-1])
  params, x = jax.device_put(params), jnp.asarray(x_nhwc)
  x_torch = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous()

  def run_torch():
    with torch.inference_mode():
      return model.forward_features(x_torch)

  t_jax, t_torch = _time([lambda: forward(params, x).block_until_ready(), run_torch], repeats)
  err = _rel_err(forward(params, x), run_torch().permute(0, 2, 3, 1).numpy())
  return dict(name="convnext_large (timm / open_clip trunk)", jax=t_jax, torch=t_torch, err=err)


def bench_dino(cfg, x_nhwc: np.ndarray, repeats: int) -> dict:
  import transformers
  d = cfg.dino
  model = transformers.Dinov2Model(transformers.Dinov2Config(
      hidden_size=d.hidden_size, num_hidden_layers=d.num_layers, num_attention_heads=d.num_heads,
      mlp_ratio=int(d.mlp_ratio), patch_size=d.patch_size, image_size=d.pretrain_image_size,
      attn_implementation="sdpa")).eval()
  with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp)
    c, params = convert.load_dinov2(tmp, d)
  c.dtype, c.remat = "float32", False
  forward = jax.jit(lambda p, x: vit_lib.ViT(c).apply({"params": p}, x).last_hidden_state)
  params, x = jax.device_put(params), jnp.asarray(x_nhwc)
  x_torch = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous()

  def run_torch():
    with torch.inference_mode():
      return model(x_torch).last_hidden_state

  t_jax, t_torch = _time([lambda: forward(params, x).block_until_ready(), run_torch], repeats)
  err = _rel_err(forward(params, x), run_torch().numpy())
  return dict(name="DINOv2 ViT-L/14 (HF Dinov2Model, sdpa)", jax=t_jax, torch=t_torch, err=err)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--encoders", default="convnext,dino")
  args = parser.parse_args()
  cfg = fusion.get_config("paper").model.vision
  s = cfg.image_size
  x = np.random.default_rng(0).standard_normal([args.batch, s, s, 3]).astype(np.float32)
  print(f"backend={jax.default_backend()} devices={jax.device_count()} "
        f"torch_threads={torch.get_num_threads()} batch={args.batch} size={s}x{s} fp32")
  benches = {"convnext": bench_convnext, "dino": bench_dino}
  for name in args.encoders.split(","):
    r = benches[name](cfg, x, args.repeats)
    print(f"{r['name']:44s} flax {r['jax'] * 1e3:9.1f} ms  torch {r['torch'] * 1e3:9.1f} ms  "
          f"ratio {r['jax'] / r['torch']:.2f}x  rel_err {r['err']:.1e}")


if __name__ == "__main__":
  main()
