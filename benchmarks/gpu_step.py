"""One-accelerator benchmark: MFU of the full train step, decode vs the HBM bound, peak memory.

    python -m benchmarks.gpu_step                      # gpu1b preset (~1.1B params), one H100/H200
    python -m benchmarks.gpu_step --preset=tiny        # the same script end to end on CPU
    python -m benchmarks.gpu_step --batch_size=16 --out=$OUT/gpu_step.json
    python -m benchmarks.gpu_step --autotune_level=0 --compilation_cache=/tmp/jax_cache

Each stage (devices, init, lower, compile, flops, steps, decode) prints its name when it starts
and its time when it ends, and the JSON report is rewritten after every stage with the stages
done so far and `stage_in_progress`, so a run cut short still says where it was and what it had.

Train step (`earthgptx_jax.trainer`, the step `train.py` runs; bf16 compute, fp32 master params,
remat policy, attention implementation: all from the preset): compile time, median step time
after warm-up, and
  * MFU = model FLOPs / step time / peak of all devices, model FLOPs being
    `perf.training_flops` (counted from the config and batch shapes: every matmul, forward and
    backward, no recomputation; XLA's count cannot be used: it counts a scanned layer once);
  * HFU = XLA's count of the same step lowered with unrolled layers (scan_layers=False: what
    the hardware runs, remat's recomputation included) / time / peak; None when an attention
    implementation is a custom call (cudnn / pallas), which XLA counts as 0 FLOPs;
where peak is the vendor's dense bf16 figure for known accelerators (H100 SXM 989 TFLOP/s, ...)
times the devices, and, beside it, a bf16 GEMM measured in this run. Decode: greedy tok/s of
the preset's LLM (bf16 weights, KV cache) at batch 1 and 32 vs the HBM bound
batch * bandwidth / (weight bytes + KV bytes) per step, bandwidth measured here by a streaming
read (and the vendor figure). Peak device memory: `device.memory_stats()["peak_bytes_in_use"]`
(accelerators; CPU reports none, so the process's peak RSS is given instead). Batches are
random but follow the batch contract (tests/model_fixtures.random_batch), so no dataset is
needed on the machine.

XLA:GPU compile time: `--autotune_level` sets --xla_gpu_autotune_level (0 skips autotuning of
GEMM / fusion configurations, often most of a first compile; 4 is XLA's default),
`--compilation_cache` enables JAX's persistent cache (a rerun skips compilation), and
`--xla_flags` appends any other flags (e.g. --xla_gpu_enable_latency_hiding_scheduler=true).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from benchmarks import decode_llm
from benchmarks.train_step import peak_rss_gb
from configs import fusion
from data_pipelines import schema
from earthgptx_jax import perf, sharding, trainer
from earthgptx_jax.models import decoding, llama
from tests.model_fixtures import random_batch

# Dense bf16 peak FLOP/s and HBM bytes/s by `device_kind` prefix (vendor data sheets).
VENDOR = {
    "NVIDIA H100 80GB HBM3": (989e12, 3.35e12),  # SXM
    "NVIDIA H100 PCIe": (756e12, 2.0e12),
    "NVIDIA H100 NVL": (835e12, 3.9e12),
    "NVIDIA H200": (989e12, 4.8e12),
    "NVIDIA A100-SXM4-80GB": (312e12, 2.04e12),
    "TPU v5p": (459e12, 2.76e12),
    "TPU v5 lite": (197e12, 0.82e12),
}


def vendor_figures(device) -> tuple[float | None, float | None]:
  kind = getattr(device, "device_kind", "")
  for prefix, figures in VENDOR.items():
    if kind.startswith(prefix):
      return figures
  return None, None


def with_token_ids(config):
  """Reserves the vocabulary's last ids for the template's placeholders (no tokenizer needed)."""
  vocab = config.model.llm.vocab_size
  config.model.token_ids.update(dict(bos=1, eos=2, pad=0, box=vocab - 4, image_patch=vocab - 3,
                                     vp_patch=vocab - 2, seg=vocab - 1))
  return config


def _unrolled(config):
  config = config.copy_and_resolve_references()
  config.model.llm.scan_layers = False
  return config


def _custom_call_attention(config) -> list[str]:
  """Config fields whose attention is a custom call (XLA counts it as 0 FLOPs)."""
  m = config.model
  fields = {"model.llm.attention_impl": m.llm.attention_impl,
            "model.vision.attention_impl": m.vision.attention_impl,
            "model.prompt.attention_impl": m.prompt.attention_impl,
            "model.pixel.decoder.attention_impl": m.pixel.decoder.attention_impl,
            "model.pixel.sam_vit.attention_impl": m.pixel.sam_vit.attention_impl}
  return [k for k, v in fields.items() if v != "xla"]


def _peak_device_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


class Stages:
  """Prints each stage as it starts and ends and rewrites the JSON report after each one."""

  def __init__(self, out: pathlib.Path, report: dict):
    self.out, self.report = out, report
    report.setdefault("stage_seconds", {})
    self.write()

  def write(self):
    self.report["peak_rss_gb"] = peak_rss_gb()
    self.out.parent.mkdir(parents=True, exist_ok=True)
    self.out.write_text(json.dumps(self.report, indent=2, default=str))

  @contextlib.contextmanager
  def __call__(self, name: str):
    print(f"[{name}] ...", flush=True)
    self.report["stage_in_progress"] = name
    self.write()
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    self.report["stage_seconds"][name] = seconds
    self.report["stage_in_progress"] = None
    self.write()
    print(f"[{name}] done in {seconds:.1f} s (peak RSS {peak_rss_gb():.2f} GB)", flush=True)


def bench_train(config, steps: int, warmup: int, stage: Stages, hfu: bool = True) -> dict:
  train = stage.report["train"] = {}
  mesh = sharding.make_mesh((1, -1, 1))
  num_tasks = len(schema.TASKS)
  rules = lambda: nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES)
  with stage("init"):
    model = trainer.build_model(config)
    optimizer = trainer.make_optimizer(config, model)
    state, state_sh = trainer.create_state(model, optimizer, config, mesh, jax.random.key(0))
    step = trainer.make_train_step(model, optimizer, config, mesh, state_sh, num_tasks)
    batch = trainer.global_batch(random_batch(config, int(config.train.batch_size)), config,
                                 mesh)
    train.update(params=int(sum(x.size for x in jax.tree.leaves(state.params))),
                 batch_size=int(config.train.batch_size), seq_len=int(config.data.max_length),
                 tokens_per_step=int(np.sum(np.asarray(batch["attention_mask"]))),
                 devices=jax.device_count())
  with stage("lower"), jax.set_mesh(mesh), rules():
    lowered = step.jitted.lower(state, batch)
  with stage("compile"):
    compiled = lowered.compile()
  train["compile_s"] = stage.report["stage_seconds"]["compile"]
  with stage("flops"):
    train["model_flops"] = perf.model_flops_per_step(config)
    train["model_flops_by_component"] = perf.training_flops(config)
    # Per device, a scan body once: kept for reference, not used as a rate.
    train["xla_flops_compiled_per_device"] = perf.compiled_flops(compiled)
    custom = _custom_call_attention(config)
    train["hfu_not_counted"] = custom or None
    if hfu and not custom:
      plain = _unrolled(config)
      plain_step = trainer.make_train_step(trainer.build_model(plain), optimizer, plain, mesh,
                                           state_sh, num_tasks)
      with jax.set_mesh(mesh), rules():
        train["xla_flops"] = perf.compiled_flops(plain_step.jitted.lower(state, batch))
    else:
      train["xla_flops"] = None
  with stage("steps"):
    times, loss = [], None
    for i in range(warmup + steps):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      loss = float(jax.block_until_ready(metrics)["loss"])
      print(f"  step {i + 1}/{warmup + steps}: {time.perf_counter() - start:.2f} s, loss "
            f"{loss:.3f}", flush=True)
      if i >= warmup:
        times.append(time.perf_counter() - start)
    train.update(step_s=statistics.median(times), loss=loss,
                 peak_device_bytes_after_train=_peak_device_bytes())
  del state
  return train


def bench_decode(config, batches, new_tokens: int, prompt_len: int, bandwidth: float,
                 reps: int) -> list[dict]:
  """Greedy decoding with the preset's LLM, bf16 weights and cache."""
  cfg = config.model.llm.copy_and_resolve_references()
  cfg.remat = False
  cfg.param_dtype = "bfloat16"
  model = llama.Llama(cfg)
  ids0 = jnp.ones((1, 4), jnp.int32)
  variables = jax.jit(model.init)(jax.random.key(0), ids0)
  variables = nn.meta.unbox(variables)
  params = variables["params"]
  n_params = sum(x.size for x in jax.tree.leaves(params))
  embed = params["embed_tokens"]["embedding"].size
  itemsize = jnp.dtype(cfg.param_dtype).itemsize
  weight_bytes = (n_params - embed) * itemsize  # embedding rows are gathered, not streamed
  rows = []
  rs = np.random.RandomState(0)
  for batch in batches:
    ids = rs.randint(3, cfg.vocab_size - 3, (batch, prompt_len))
    mask = np.ones_like(ids, bool)

    def run():
      out = decoding.generate(model, variables, input_ids=jnp.asarray(ids), attention_mask=mask,
                              max_new_tokens=new_tokens, eos_id=-1, pad_id=0)
      return jax.block_until_ready(out.tokens)

    seconds = decode_llm._median_time(run, reps)
    kv_bytes = (2 * cfg.num_layers * batch * cfg.num_kv_heads * cfg.head_dim
                * jnp.dtype(cfg.dtype).itemsize * (prompt_len + new_tokens / 2))
    bound = batch * bandwidth / (weight_bytes + kv_bytes)
    tok_s = batch * new_tokens / seconds
    rows.append(dict(batch=batch, tok_s=tok_s, bound_tok_s=bound, fraction_of_bound=tok_s / bound,
                     seconds=seconds))
  return rows


def _xla_options(args) -> None:
  """Sets XLA_FLAGS / the compilation cache from the options; before any backend starts."""
  flags = [os.environ.get("XLA_FLAGS", "")]
  if args.autotune_level is not None:
    flags.append(f"--xla_gpu_autotune_level={args.autotune_level}")
  flags.extend(args.xla_flags or [])
  os.environ["XLA_FLAGS"] = " ".join(f for f in flags if f).strip()
  if args.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def bench_loop(steps: int = 20) -> dict | None:
  """The training loop's time per step over its compiled step's, tiny preset (benchmarks/loop.py,
  target <= 1.1x); None (and the error) if it cannot run here."""
  from benchmarks import loop  # its imports (the data pipeline) are needed only here
  try:
    r = loop.run("tiny", steps=steps)
  except Exception as e:  # noqa: BLE001 — the other figures are still worth writing
    print(f"loop ratio: not measured ({type(e).__name__}: {e})", flush=True)
    return None
  print(f"loop, tiny: {r['loop_step_s'] * 1e3:.1f} ms/step vs compiled step "
        f"{r['compiled_step_s'] * 1e3:.1f} ms: {r['ratio']:.2f}x (target <= 1.1x)", flush=True)
  return r


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="gpu1b", help="configs/fusion.py preset")
  parser.add_argument("--batch_size", type=int, default=None, help="default: the preset's")
  parser.add_argument("--steps", type=int, default=5, help="timed train steps (median)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--decode_batches", type=int, nargs="*", default=[1, 32],
                      help="decode batch sizes; none skips decoding")
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--reps", type=int, default=3, help="timed decode runs (median)")
  parser.add_argument("--attention_impl", default=None,
                      help="override every attention_impl (xla | cudnn | pallas | auto)")
  parser.add_argument("--autotune_level", type=int, default=None,
                      help="--xla_gpu_autotune_level (0: no autotuning; XLA's default 4)")
  parser.add_argument("--compilation_cache", default=None,
                      help="JAX persistent compilation cache folder (a rerun skips compiling)")
  parser.add_argument("--xla_flags", nargs="*", default=None, help="more XLA_FLAGS")
  parser.add_argument("--no_hfu", action="store_true",
                      help="skip lowering the unrolled step for the HFU count")
  parser.add_argument("--no_loop", action="store_true",
                      help="skip the tiny preset's loop / compiled-step ratio (the last stage)")
  parser.add_argument("--out", default="benchmarks/results/gpu_step.json")
  args = parser.parse_args()
  _xla_options(args)

  config = with_token_ids(fusion.get_config(args.preset))
  if args.batch_size:
    config.train.batch_size = args.batch_size
  if args.attention_impl:
    config.model.llm.attention_impl = args.attention_impl
  report = dict(preset=args.preset, jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS"),
                compilation_cache=args.compilation_cache)
  stage = Stages(pathlib.Path(args.out), report)
  with stage("devices"):
    device = jax.devices()[0]
    vendor_peak, vendor_bw = vendor_figures(device)
    compute_dtype = jnp.dtype(config.model.llm.dtype)
    gemm_size = 8192 if jax.default_backend() != "cpu" else 1024
    measured_peak = perf.measured_matmul_peak(size=gemm_size, dtype=compute_dtype)
    # A streaming read larger than any cache: 4 GiB on accelerators, 1 GiB on the host.
    bandwidth = decode_llm.read_bandwidth(num_bytes=(4 << 30) if jax.default_backend() != "cpu"
                                          else (1 << 30))
    report.update(device=device.device_kind, backend=jax.default_backend(),
                  devices=jax.device_count(), measured_gemm_flop_s=measured_peak,
                  measured_read_bytes_s=bandwidth, vendor_peak_flop_s=vendor_peak,
                  vendor_bandwidth_bytes_s=vendor_bw)
  print(f"device {device.device_kind} ({jax.default_backend()}) x {jax.device_count()}, preset "
        f"{args.preset}, measured {compute_dtype.name} GEMM {measured_peak / 1e9:.0f} GFLOP/s, "
        f"read bandwidth {bandwidth / 1e9:.0f} GB/s"
        + (f"; vendor {vendor_peak / 1e12:.0f} TFLOP/s, {vendor_bw / 1e12:.2f} TB/s per device"
           if vendor_peak else ""), flush=True)

  train = bench_train(config, args.steps, args.warmup, stage, hfu=not args.no_hfu)
  # Step FLOPs are the whole step's (all devices): divide by all devices' peak.
  peak = vendor_peak * jax.device_count() if vendor_peak else measured_peak
  for key, flops in (("mfu", train["model_flops"]), ("hfu", train["xla_flops"])):
    train[key] = flops / train["step_s"] / peak if flops else None
    train[f"{key}_vs_measured_gemm"] = flops / train["step_s"] / measured_peak if flops else None
  stage.write()
  print(f"train step: {train['params'] / 1e6:.1f}M params, batch {train['batch_size']} x "
        f"{train['seq_len']} ({train['tokens_per_step']} real tokens), compile "
        f"{train['compile_s']:.1f} s, step {train['step_s'] * 1e3:.1f} ms, loss {train['loss']:.3f}",
        flush=True)
  hfu = (f"HFU {train['hfu']:.1%}" if train["hfu"] is not None else
         f"HFU not counted ({', '.join(train['hfu_not_counted'] or ['--no_hfu'])})")
  print(f"  MFU {train['mfu']:.1%} ({train['model_flops'] / 1e12:.3f} TFLOP/step), {hfu}, of "
        f"{'vendor' if vendor_peak else 'measured'} peak {peak / 1e9:.0f} GFLOP/s; "
        f"MFU {train['mfu_vs_measured_gemm']:.1%} of the measured GEMM", flush=True)

  with stage("decode"):
    decode = report["decode"] = bench_decode(config, args.decode_batches, args.new_tokens,
                                             args.prompt_len, bandwidth, args.reps)
  for d in decode:
    vendor_bound = (d["bound_tok_s"] * vendor_bw / bandwidth) if vendor_bw else None
    d["vendor_bound_tok_s"] = vendor_bound
    print(f"decode batch {d['batch']}: {d['tok_s']:.0f} tok/s, HBM bound {d['bound_tok_s']:.0f} "
          f"tok/s (measured bandwidth): {d['fraction_of_bound']:.0%}"
          + (f"; vendor-bandwidth bound {vendor_bound:.0f} tok/s" if vendor_bound else ""),
          flush=True)
  peak_bytes = report["peak_device_bytes"] = _peak_device_bytes()
  print("peak device memory: " + (f"{peak_bytes / 2**30:.2f} GiB" if peak_bytes else
                                  f"not reported by {jax.default_backend()}; process peak RSS "
                                  f"{peak_rss_gb():.2f} GB"))
  if not args.no_loop:
    with stage("loop"):
      report["loop"] = bench_loop()
  report["finished"] = True
  stage.write()
  print(f"wrote {stage.out}")


if __name__ == "__main__":
  main()
