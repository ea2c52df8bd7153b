"""Throughput accounting: FLOPs counted by XLA, a measured matmul peak, MFU."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled jit function as XLA counts them (None if unknown)."""
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
