"""Greedy KV-cached decoding: this project vs HF `generate`, same weights, same CPU, one run.

    python benchmarks/decode_llm.py            # 56M LLaMA (h512, 8 layers, GQA 8/4, V 32000)
    python benchmarks/decode_llm.py --quick    # a tiny model, to check the script end to end

Reports tokens/s for batch 1 and 8 (128 new tokens after a 16-token prompt), the ratio to HF,
and the memory-bandwidth bound: every decode step must read all weights except the embedding
table (plus the KV cache), so tok/s <= batch * read_bandwidth / bytes_per_step, with the read
bandwidth measured in the same run (a large jitted reduction). Large batches become
compute-bound instead: the compute bound (GEMM FLOP/s measured in the same run / 2 FLOPs per
weight per token) is printed beside it. Timing: one warm-up (compile),
then the median of several repetitions, `block_until_ready` on our side. Both sides run float32
and must produce the same ids (checked). Writes JSON next to the table (benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from configs import fusion
from earthgptx_jax.convert import llama as convert
from earthgptx_jax.models import decoding, llama

SIZES = {
    "56m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=4, head_dim=64),
    "quick": dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}
PROMPT_LEN = 16


def _median_time(fn, reps: int) -> float:
  fn()  # warm-up: compilation / allocator
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def read_bandwidth(num_bytes: int = 1 << 30, reps: int = 5) -> float:
  """Bytes/s of a streaming read: a jitted sum over a `num_bytes` float32 array (all cores)."""
  x = jnp.ones((num_bytes // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  seconds = _median_time(lambda: total(x).block_until_ready(), reps)
  return num_bytes / seconds


def gemm_flops(n: int = 1024, reps: int = 5) -> float:
  """FLOP/s of a jitted float32 [n, n] @ [n, n] matmul: the compute side of the roofline."""
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  return 2 * n ** 3 / _median_time(lambda: matmul(a, a).block_until_ready(), reps)


def run(size: str = "56m", batches=(1, 8), new_tokens: int = 128, reps: int = 3) -> dict:
  """Times ours and HF generate for each batch size; returns the report (see module doc)."""
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(**SIZES[size], max_position_embeddings=1024, pad_token_id=0,
                                    bos_token_id=1, eos_token_id=None)
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  with tempfile.TemporaryDirectory() as folder:
    hf.save_pretrained(folder)
    cfg, params = convert.load_hf_llama(folder, fusion.get_config("tiny").model.llm)
  variables = jax.device_put({"params": params})
  model = llama.Llama(cfg)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  embed_params = params["embed_tokens"]["embedding"].size
  weight_bytes_per_step = (n_params - embed_params) * 4  # float32; embedding rows are gathered

  bandwidth = read_bandwidth()
  flops = gemm_flops()
  flops_per_token = 2 * (n_params - embed_params)  # one multiply-add per weight read
  rows = []
  rs = np.random.RandomState(0)
  for batch in batches:
    ids = rs.randint(2, cfg.vocab_size, (batch, PROMPT_LEN))
    mask = np.ones_like(ids, bool)
    ids_t, mask_t = torch.tensor(ids), torch.tensor(mask.astype(np.int64))

    def run_hf():
      with torch.no_grad():
        return hf.generate(ids_t, attention_mask=mask_t, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def run_ours():
      out = decoding.generate(model, variables, input_ids=jnp.asarray(ids), attention_mask=mask,
                              max_new_tokens=new_tokens, eos_id=-1, pad_id=0)
      return jax.block_until_ready(out.tokens)

    ours_s = _median_time(run_ours, reps)
    hf_s = _median_time(run_hf, reps)
    same = float(np.mean(np.asarray(run_ours()) == run_hf()[:, PROMPT_LEN:].numpy()))
    # KV cache read per step (average over the generation), float32 K and V.
    cache_bytes = (2 * cfg.num_layers * batch * cfg.num_kv_heads * cfg.head_dim * 4
                   * (PROMPT_LEN + new_tokens / 2))
    bound = batch * bandwidth / (weight_bytes_per_step + cache_bytes)
    compute_bound = flops / flops_per_token
    tokens = batch * new_tokens
    rows.append(dict(batch=batch, ours_tok_s=tokens / ours_s, hf_tok_s=tokens / hf_s,
                     ratio_vs_hf=hf_s / ours_s, bound_tok_s=bound,
                     compute_bound_tok_s=compute_bound,
                     fraction_of_bound=tokens / ours_s / bound, same_ids_fraction=same))

  return dict(model=size, params=n_params, weight_bytes_per_step=weight_bytes_per_step,
              read_bandwidth_gb_s=bandwidth / 1e9, gemm_gflop_s=flops / 1e9,
              new_tokens=new_tokens, prompt_len=PROMPT_LEN, jax=jax.__version__,
              torch=torch.__version__, torch_threads=torch.get_num_threads(),
              device=str(jax.devices()[0]), rows=rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny model, end-to-end check")
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--out", default="benchmarks/results/decode_llm.json")
  args = parser.parse_args()

  size = "quick" if args.quick else "56m"
  report = run(size, args.batches, args.new_tokens, args.reps)
  rows, n_params = report["rows"], report["params"]
  print(f"model {size}: {n_params / 1e6:.1f}M params, "
        f"{report['weight_bytes_per_step'] / 1e6:.0f} MB weights read per step, read bandwidth "
        f"{report['read_bandwidth_gb_s']:.1f} GB/s, GEMM {report['gemm_gflop_s']:.1f} GFLOP/s")
  print(f"{'batch':>5} {'ours tok/s':>11} {'HF tok/s':>9} {'ratio':>6} {'bound tok/s':>12} "
        f"{'of bound':>9} {'compute bound':>14} {'same ids':>9}")
  for r in rows:
    print(f"{r['batch']:>5} {r['ours_tok_s']:>11.1f} {r['hf_tok_s']:>9.1f} "
          f"{r['ratio_vs_hf']:>5.2f}x {r['bound_tok_s']:>12.1f} {r['fraction_of_bound']:>8.0%} "
          f"{r['compute_bound_tok_s']:>14.1f} {r['same_ids_fraction']:>9.0%}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
