"""LLM-only train step: our jitted LLaMA step vs HF `LlamaForCausalLM` eager, same weights, CPU.

    python -m benchmarks.llm_step                 # 56M (h512, 8L, GQA 8/4, V 32000), B=4 L=512
    python -m benchmarks.llm_step --quick         # a tiny model, to check the script end to end
    python -m benchmarks.llm_step --ce_chunk=0    # the plain cross-entropy ([B, L, V] logits)

One step on each side: forward, next-token cross-entropy over every position, backward, AdamW,
all float32. Ours uses `model.llm.ce_chunk_size` (losses.chunked_token_cross_entropy: logits of a
chunk of positions at a time, the gradient formed in the same pass) unless `--ce_chunk=0`.
Besides the two step times (alternating, median) it reports what bounds them, measured in the
same run: each side's float32 GEMM rate on the step's largest matmul shape ([B*L, D] x [D, V]),
the step's matmul FLOPs (6 per weight per token for the dense layers + attention) and the time
those FLOPs take at each side's rate, so "ours / torch" can be read against "their GEMM rates".
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers

from benchmarks.decode_llm import SIZES
from configs import fusion
from earthgptx_jax import losses, perf
from earthgptx_jax.convert import llama as convert
from earthgptx_jax.models import llama

LR = 1e-4


def matmul_flops(cfg, batch: int, length: int) -> float:
  """Matmul FLOPs of one train step (forward + backward = 3x forward), embedding excluded."""
  d, f, n, k, h = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                   cfg.head_dim)
  per_layer = d * (n * h) * 2 + d * (k * h) * 2 + 3 * d * f  # q, o, k, v; gate, up, down
  dense = cfg.num_layers * per_layer + d * cfg.vocab_size
  attention = cfg.num_layers * 2 * 2 * n * h * length  # QK^T and PV per token (full square)
  return 3 * 2 * batch * length * (dense + attention / 2)


def gemm_rates(rows: int, d: int, v: int, reps: int = 3) -> tuple[float, float]:
  """(ours, torch) float32 FLOP/s of [rows, d] @ [d, v], the step's largest matmul."""
  a = np.random.default_rng(0).standard_normal((rows, d)).astype(np.float32)
  b = np.random.default_rng(1).standard_normal((d, v)).astype(np.float32)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  mm = jax.jit(jnp.matmul)
  mm(ja, jb).block_until_ready()
  torch.matmul(ta, tb)
  ours, ref = perf.interleaved_median(
      [lambda: mm(ja, jb).block_until_ready(), lambda: torch.matmul(ta, tb)], reps)
  flops = 2 * rows * d * v
  return flops / ours, flops / ref


def build(size: str, ce_chunk: int):
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(**SIZES[size], max_position_embeddings=1024, pad_token_id=0,
                                    bos_token_id=1, eos_token_id=2)
  hf = transformers.LlamaForCausalLM(hf_cfg).train()
  base = fusion.get_config("tiny").model.llm
  base.ce_chunk_size = ce_chunk
  with tempfile.TemporaryDirectory() as folder:
    hf.save_pretrained(folder)
    cfg, params = convert.load_hf_llama(folder, base)
  return hf, cfg, jax.device_put(params)


def our_step(cfg):
  model = llama.Llama(cfg)
  optimizer = optax.adamw(LR, weight_decay=0.0)

  def loss_fn(params, ids, targets):
    out = model.apply({"params": params}, ids)
    mask = jnp.ones(targets.shape, bool)
    ce, _, _ = llama.token_cross_entropy(out, params, cfg, targets, mask)
    return ce

  def step(params, opt_state, ids, targets):
    loss, grads = jax.value_and_grad(loss_fn)(params, ids, targets)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return optimizer, jax.jit(step, donate_argnums=(0, 1))


def run(size: str = "56m", batch: int = 4, length: int = 512, reps: int = 3,
        ce_chunk: int = 128) -> dict:
  hf, cfg, params = build(size, ce_chunk)
  optimizer, step = our_step(cfg)
  opt_state = optimizer.init(params)
  rs = np.random.RandomState(0)
  tokens = rs.randint(3, cfg.vocab_size, (batch, length + 1))
  ids, targets = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])
  t_ids, t_targets = torch.tensor(tokens[:, :-1]), torch.tensor(tokens[:, 1:])
  t_opt = torch.optim.AdamW(hf.parameters(), lr=LR, weight_decay=0.0)

  def torch_step():
    logits = hf(t_ids).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), t_targets.flatten())
    t_opt.zero_grad(set_to_none=True)
    loss.backward()
    t_opt.step()
    return loss.item()

  state = {"params": params, "opt": opt_state}

  def jax_step():
    state["params"], state["opt"], loss = step(state["params"], state["opt"], ids, targets)
    return float(loss)

  start = time.perf_counter()
  first_ours = jax_step()
  compile_s = time.perf_counter() - start
  first_torch = torch_step()
  ours_s, torch_s = perf.interleaved_median([jax_step, torch_step], reps)
  ours_rate, torch_rate = gemm_rates(batch * length, cfg.hidden_size, cfg.vocab_size)
  flops = matmul_flops(cfg, batch, length)
  return dict(model=size, batch=batch, length=length, ce_chunk=ce_chunk, ours_s=ours_s,
              torch_s=torch_s, ratio=ours_s / torch_s, first_loss_ours=first_ours,
              first_loss_torch=first_torch, compile_s=compile_s, matmul_flops=flops,
              ours_gemm_flop_s=ours_rate, torch_gemm_flop_s=torch_rate,
              ours_matmul_bound_s=flops / ours_rate, torch_matmul_bound_s=flops / torch_rate,
              torch_threads=torch.get_num_threads(), jax=jax.__version__,
              torch=torch.__version__)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny model, end-to-end check")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--ce_chunk", type=int, default=128, help="0: plain [B, L, V] CE")
  parser.add_argument("--out", default="benchmarks/results/llm_step.json")
  args = parser.parse_args()
  r = run("quick" if args.quick else "56m", args.batch, args.length, args.reps, args.ce_chunk)
  print(f"LLM step {r['model']} B={r['batch']} L={r['length']} ce_chunk={r['ce_chunk']}: ours "
        f"{r['ours_s']:.3f} s, HF eager {r['torch_s']:.3f} s, ratio {r['ratio']:.2f}x "
        f"(compile {r['compile_s']:.0f} s; first loss {r['first_loss_ours']:.4f} / "
        f"{r['first_loss_torch']:.4f})")
  print(f"GEMM [B*L, D] x [D, V]: ours {r['ours_gemm_flop_s'] / 1e9:.1f} GFLOP/s, torch "
        f"{r['torch_gemm_flop_s'] / 1e9:.1f}; step matmuls {r['matmul_flops'] / 1e9:.0f} GFLOP = "
        f"{r['ours_matmul_bound_s']:.2f} s at our rate, {r['torch_matmul_bound_s']:.2f} s at "
        f"torch's")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
  main()
