"""Every benchmark side by side in one run: ours, the reference, the ratio, the machine's bound.

    python -m benchmarks.run_all            # full sizes (tens of minutes on 2 cores)
    python -m benchmarks.run_all --quick    # same rows, smaller inputs, fewer repetitions
    python -m benchmarks.run_all --rows=train,fsdp

Rows (targets from issue 9):
  llm       LLM-only train step, 56M LLaMA, B=4 L=512, float32: ours (chunked CE) vs HF eager
            (<= 1.0x), beside each side's GEMM rate measured in the same run
            (benchmarks/llm_step.py).
  decode    greedy tok/s at batch 1 and 8, 128 new tokens, 56M LLaMA: ours vs HF `generate` on
            the same weights (>= 3x) and vs the read-bandwidth bound measured here (>= 70 %)
            (benchmarks/decode_llm.py).
  train     the full model's train step, tiny preset, a loader batch: ours vs the eager PyTorch
            step of the exported model (<= 1.0x); our FLOP/s as a fraction of the float32 GEMM
            rate measured in the same run; the step's compile time (<= 60 s) and peak RSS
            (benchmarks/train_step.py).
  loader    examples/s of the preset's input pipeline on one core vs what that train step
            consumes (>= 5x).
  encoders  forward of ConvNeXt-L and DINOv2 ViT-L/14 (benchmarks/encoders.py) and SAM ViT-B
            (benchmarks/sam.py) vs their PyTorch references, same weights.
  infer     one `python -m earthgptx_jax.infer` call on the tiny preset (random weights), cold
            (empty XLA cache) and warm (a second call: <= 5 s), and a loaded Predictor's first
            streamed token and full answer (benchmarks/infer_latency.py).
  fsdp      bytes of train state (params + AdamW moments) per device on an 8-device CPU mesh,
            vs total / 8 (<= +5 %), on a 1 x 4 x 2 mesh: the tiny preset materialised (bytes of
            the shards resident on the fullest device) and the paper preset from its shardings
            (planned shard shapes; 7B does not fit this machine).
  loop      the training loop's time per step (training.train_and_evaluate, tiny preset) over
            its compiled step's, called back-to-back, in one run (<= 1.1x; benchmarks/loop.py).
Timing discipline everywhere: warm-up (compile) outside the timings, several repetitions,
the median, `block_until_ready` on our side, ours and the reference alternating so that load
from other processes on a shared machine hits both alike. JSON of every figure goes to
benchmarks/results/run_all.json (git-ignored).
"""

from __future__ import annotations

from earthgptx_jax import host_memory

if __name__ == "__main__":  # as the train command does, before the imports below
  host_memory.reexec_with_huge_page_malloc()

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys

ROWS = ("train", "loader", "loop", "llm", "decode", "encoders", "fsdp", "infer")
FSDP_DEVICES = 8
# data x fsdp x tensor. Pure 8-way FSDP (1 x 8 x 1) cannot be laid out: the mask decoder's
# 4-wide output heads (3 multimask + 1) carry an fsdp-mapped axis; 1 x 4 x 2 can.
TINY_MESH = PAPER_MESH = (1, 4, 2)


def _row(name, ours, ref, unit, ratio=None, bound="", target="", note=""):
  return dict(name=name, ours=ours, reference=ref, unit=unit, ratio=ratio, bound=bound,
              target=target, note=note)


def train_rows(args, results) -> list[dict]:
  from benchmarks import loader as loader_bench
  from benchmarks import train_step
  data, batch = train_step.prepared_data("tiny", args.train_batch, args.data_dir)
  r = train_step.run(data, batch, repeats=args.repeats, with_torch=not args.no_torch)
  results["train"] = r
  rows = []
  frac = r.get("fraction_of_gemm_peak")
  bound = (f"{r['jax_flop_s'] / 1e9:.2f} GFLOP/s = {frac:.1%} of GEMM peak "
           f"{r['gemm_peak_flop_s'] / 1e9:.0f}" if frac is not None else "XLA gave no FLOP count")
  name = f"train step, tiny, B={r['batch_size']} L={r['seq_len']} (s)"
  if "torch_step_s" in r:
    rows.append(_row(name, r["jax_step_s"], r["torch_step_s"], "s", r["ratio_vs_torch"], bound,
                     "<= 1.0x", f"first loss ours {r['jax_first_loss']:.5f} / torch "
                     f"{r['torch_first_loss']:.5f}"))
  else:
    rows.append(_row(name, r["jax_step_s"], None, "s", None, bound, "<= 1.0x",
                     "PyTorch reference not run"))
  rows.append(_row("compile, tiny train step (s)", r["compile_s"], None, "s", None, "",
                   "<= 60 s"))
  rows.append(_row("peak RSS after our train step (GB)", r["rss_after_jax_gb"], None, "GB",
                   note="whole process (includes the data pipeline)"))
  if "rss_after_torch_gb" in r:
    rows.append(_row("peak RSS after the torch step too (GB)", r["rss_after_torch_gb"], None,
                     "GB"))
  if "loader" in args.rows:
    iterator = data.train_iterator()
    rate = loader_bench.examples_per_second(iterator, args.loader_batches, r["batch_size"])
    iterator.close()
    results["loader"] = dict(examples_per_s_one_core=rate, consumed_per_s=r["examples_per_s"])
    rows.append(_row("loader ex/s on 1 core vs train step's ex/s", rate, r["examples_per_s"],
                     "ex/s", rate / r["examples_per_s"], "", ">= 5x",
                     "in-process (num_workers=0), tiny preset"))
  return rows


def loop_rows(args, results) -> list[dict]:
  from benchmarks import loop
  r = loop.run("tiny", steps=10 if args.quick else 20, data_dir=args.data_dir,
               batch_size=args.train_batch)
  results["loop"] = r
  return [_row(f"train loop per step / compiled step, tiny B={r['batch_size']} (s)",
               r["loop_step_s"], r["compiled_step_s"], "s", r["ratio"], "", "<= 1.1x",
               f"{r['steps']} steps; load average {r['load_average'][0]:.1f}")]


def llm_rows(args, results) -> list[dict]:
  from benchmarks import llm_step
  r = llm_step.run("56m", 4, 512, reps=args.repeats)
  results["llm"] = r
  bound = (f"matmuls at GEMM rate: ours {r['ours_matmul_bound_s']:.2f} s, torch "
           f"{r['torch_matmul_bound_s']:.2f} s")
  return [_row("LLM-only train step, 56M LLaMA, B=4 L=512 (s)", r["ours_s"], r["torch_s"], "s",
               r["ratio"], bound, "<= 1.0x", f"ce_chunk {r['ce_chunk']}, first loss "
               f"{r['first_loss_ours']:.4f} / {r['first_loss_torch']:.4f}")]


def decode_rows(args, results) -> list[dict]:
  from benchmarks import decode_llm
  r = decode_llm.run("56m", (1, 8), new_tokens=128, reps=args.repeats)
  results["decode"] = r
  rows = []
  for d in r["rows"]:
    rows.append(_row(f"decode tok/s, 56M LLaMA, batch {d['batch']}", d["ours_tok_s"],
                     d["hf_tok_s"], "tok/s", d["ratio_vs_hf"],
                     f"BW bound {d['bound_tok_s']:.0f} tok/s: {d['fraction_of_bound']:.0%} "
                     f"(compute bound {d['compute_bound_tok_s']:.0f})",
                     ">= 3x, >= 70% of bound", f"same ids {d['same_ids_fraction']:.0%}"))
  return rows


def encoder_rows(args, results) -> list[dict]:
  import numpy as np

  from benchmarks import encoders, sam
  from configs import fusion
  cfg = fusion.get_config("paper").model.vision
  s = args.encoder_size
  x = np.random.default_rng(0).standard_normal([1, s, s, 3]).astype(np.float32)
  rows, results["encoders"] = [], {}
  for key, bench in (("convnext", encoders.bench_convnext), ("dino", encoders.bench_dino)):
    r = bench(cfg, x, args.repeats)
    results["encoders"][key] = r
    rows.append(_row(f"{r['name'].split(' (')[0]} fwd {s}px (ms)", 1e3 * r["jax"],
                     1e3 * r["torch"], "ms", r["jax"] / r["torch"], "", "<= 1.0x",
                     f"rel err {r['err']:.0e}"))
  sam_cfg, model, params = sam.build(args.sam_size)
  r = sam.bench_image_encoder(sam_cfg, model, params, 1, args.repeats)
  results["encoders"]["sam_vit_b"] = r
  rows.append(_row(f"SAM ViT-B fwd {args.sam_size}px (ms)", 1e3 * r["jax"], 1e3 * r["torch"],
                   "ms", r["jax"] / r["torch"], "", "<= 1.0x", f"rel err {r['err']:.0e}"))
  return rows


def fsdp_state_bytes(preset: str, mesh_shape: tuple[int, int, int], materialise: bool) -> dict:
  """Train-state bytes in total and on the fullest device of a `mesh_shape` mesh.

  Runs in a process whose JAX has FSDP_DEVICES host devices (see `fsdp_rows`).
  """
  import jax
  import numpy as np

  from configs import fusion
  from earthgptx_jax import sharding, trainer
  config = fusion.get_config(preset)
  vocab = config.model.llm.vocab_size
  config.model.token_ids.update(dict(bos=1, eos=2, pad=0, box=vocab - 4, image_patch=vocab - 3,
                                     vp_patch=vocab - 2, seg=vocab - 1))
  mesh = sharding.make_mesh(mesh_shape)
  model = trainer.build_model(config)
  optimizer = trainer.make_optimizer(config, model)
  abstract, shardings = trainer.state_shardings(model, optimizer, config, mesh)
  leaves = jax.tree.leaves(abstract)
  shards = jax.tree.leaves(shardings)
  total = sum(x.size * x.dtype.itemsize for x in leaves)
  planned = sum(int(np.prod(sh.shard_shape(x.shape))) * x.dtype.itemsize
                for x, sh in zip(leaves, shards))
  out = dict(preset=preset, mesh=list(mesh.devices.shape), devices=mesh.devices.size,
             total_bytes=total,
             planned_per_device_bytes=planned)
  if materialise:
    state, _ = trainer.create_state(model, optimizer, config, mesh, jax.random.key(0))
    resident = {d: 0 for d in mesh.devices.flat}
    for leaf in jax.tree.leaves(state):
      for shard in leaf.addressable_shards:
        resident[shard.device] += shard.data.nbytes
    out["resident_per_device_bytes"] = max(resident.values())
  return out


def fsdp_rows(args, results) -> list[dict]:
  """Measured in a child process: host-device count is fixed when JAX starts."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={FSDP_DEVICES}")
  code = ("import json, sys; from benchmarks.run_all import fsdp_state_bytes; "
          f"print(json.dumps([fsdp_state_bytes('tiny', {TINY_MESH}, True), "
          f"fsdp_state_bytes('paper', {PAPER_MESH}, False)]))")
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        check=False)
  if proc.returncode:
    raise RuntimeError(f"fsdp child process failed:\n{proc.stderr[-3000:]}")
  tiny, paper = json.loads(proc.stdout.strip().splitlines()[-1])
  results["fsdp"] = dict(tiny=tiny, paper=paper)
  rows = []
  for r, key, how in ((tiny, "resident_per_device_bytes", "resident"),
                      (paper, "planned_per_device_bytes", "from shardings")):
    even = r["total_bytes"] / r["devices"]
    mesh = "x".join(map(str, r["mesh"]))
    rows.append(_row(f"state/device, {r['preset']}, mesh {mesh} ({how}) (MB)",
                     r[key] / 1e6, even / 1e6, "MB", r[key] / even,
                     f"total {r['total_bytes'] / 1e6:.4g} MB / {r['devices']}", "<= 1.05x"))
  return rows


def infer_rows(args, results) -> list[dict]:
  from benchmarks import infer_latency
  r = infer_latency.run(max_new_tokens=64, reps=args.repeats)
  results["infer"] = r
  p, loads = r["predictor"], [w["load_before"] for w in r["cli_warm"]["runs"]]
  return [
      _row("infer CLI, second call, tiny, 64 new tokens (s)", r["cli_warm"]["wall_s"],
           r["cli_cold"]["wall_s"], "s", None, "reference: the first call (compiles)",
           "<= 5 s", f"{r['cli_warm']['cpu_s']:.1f} s CPU; load average "
           f"{min(loads):.1f}-{max(loads):.1f}"),
      _row("infer, loaded model: first token (ms)", 1e3 * p["first_token_s"], None, "ms",
           note=f"streamed; load average {p['load_average']:.1f}"),
      _row("infer, loaded model: full answer, <= 64 tokens (ms)", 1e3 * p["full_answer_s"], None,
           "ms", note="text, boxes and masks")]


def _fmt(value) -> str:
  if value is None:
    return "-"
  return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"


def print_table(rows: list[dict]) -> None:
  header = (f"{'measurement':58s} {'ours':>10s} {'reference':>10s} {'ratio':>7s}  "
            f"{'bound / check':42s} {'target':22s} {'load':9s} note")
  print(header)
  print("-" * len(header))
  for r in rows:
    ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
    print(f"{r['name']:58s} {_fmt(r['ours']):>10s} {_fmt(r['reference']):>10s} {ratio:>7s}  "
          f"{r['bound']:42s} {r['target']:22s} {r['load']:9s} {r['note']}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="smaller encoder inputs and fewer repetitions (a few minutes)")
  parser.add_argument("--rows", default=",".join(ROWS), help=f"subset of {ROWS}")
  parser.add_argument("--repeats", type=int, default=None, help="default 5, quick 2")
  parser.add_argument("--train_batch", type=int, default=8)
  parser.add_argument("--loader_batches", type=int, default=None, help="default 20, quick 5")
  parser.add_argument("--encoder_size", type=int, default=None, help="default 448, quick 224")
  parser.add_argument("--sam_size", type=int, default=None, help="default 1024, quick 512")
  parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch train step")
  parser.add_argument("--data_dir", default="/tmp/earthgptx_bench_data")
  parser.add_argument("--out", default="benchmarks/results/run_all.json")
  args = parser.parse_args()
  args.rows = [r for r in args.rows.split(",") if r]
  unknown = set(args.rows) - set(ROWS)
  if unknown:
    parser.error(f"--rows: unknown {sorted(unknown)}; expected a subset of {ROWS}")
  defaults = dict(repeats=(2, 5), loader_batches=(5, 20), encoder_size=(224, 448),
                  sam_size=(512, 1024))
  for name, (quick, full) in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, quick if args.quick else full)

  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import torch
  results = dict(when=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                 args=vars(args), machine=platform.machine(), cpus=os.cpu_count(),
                 jax=jax.__version__, torch=torch.__version__,
                 torch_threads=torch.get_num_threads(), backend=jax.default_backend())
  sections = (({"train", "loader"}, train_rows), ({"loop"}, loop_rows), ({"llm"}, llm_rows),
              ({"decode"}, decode_rows), ({"encoders"}, encoder_rows), ({"fsdp"}, fsdp_rows),
              ({"infer"}, infer_rows))
  rows = []
  for names, measure in sections:
    if names & set(args.rows):
      load_before = os.getloadavg()[0]
      new = measure(args, results)
      # The machine may be shared: a loaded reference flatters us, so each row says how busy it was.
      load = f"{load_before:.1f}-{os.getloadavg()[0]:.1f}"
      for r in new:  # progress: the full table comes at the end
        r["load"] = load
        print(f"[run_all] {r['name']}: ours {_fmt(r['ours'])} ref {_fmt(r['reference'])}",
              flush=True)
      rows += new
  results["rows"] = rows
  print(f"\nbackend {results['backend']}, {results['cpus']} CPUs, torch threads "
        f"{results['torch_threads']}, jax {results['jax']}, torch {results['torch']}"
        f"{' (quick)' if args.quick else ''}")
  print_table(rows)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=2, default=str))
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
