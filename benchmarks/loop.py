"""The training loop's time per step against its compiled step's, in one run (issue 23: <= 1.1x).

    python -m benchmarks.loop                       # tiny preset, 2 x 20 steps
    python -m benchmarks.loop --steps=10 --preset=tiny

Loop: `training.train_and_evaluate` itself (prefetch thread, async dispatch, metrics read at
the log interval, an async checkpoint at the end) on synthetic_rs, 2 x `steps` steps logged
every `steps`; its time per step is the second log interval's wall time / steps (the first
holds the first call's one-off costs). Compiled step: the same step program called
back-to-back `steps` times on one batch already on device, blocking only at the end: what the
device needs per step when the host never makes it wait. Ratio = loop / compiled. On a CPU the
"device" is the same cores that load the data, so the loader's work shows in the ratio; on an
accelerator it overlaps.
"""

from __future__ import annotations

from earthgptx_jax import host_memory

if __name__ == "__main__":  # as the train command does, before the imports below
  host_memory.reexec_with_huge_page_malloc()

import argparse
import json
import os
import pathlib
import tempfile
import time

import jax
from flax import linen as nn

from configs import fusion
from data_pipelines import pipeline, tokenizer_training
from earthgptx_jax import sharding, trainer, training
from earthgptx_jax import tokenizer as tokenizer_lib


def _config(preset: str, steps: int, data_dir: str, batch_size: int | None):
  config = fusion.get_config(preset)
  if batch_size:
    config.train.batch_size = batch_size
  config.data.data_dir = data_dir
  config.data.synthetic.num_train = 64  # a few batches' worth, not the preset's full set
  config.data.synthetic.num_eval = 8
  config.data.num_workers = 0
  config.train.update(dict(steps=2 * steps, log_every_steps=steps, eval_every_steps=0,
                           eval_examples=8, alignment_steps=0, peak_flops=1e12))
  config.checkpoint.every_steps = 10 ** 9  # one (async) save, at the end
  return config


def compiled_step_s(config, steps: int) -> float:
  """Seconds per step of the compiled train step, `steps` calls back-to-back on one batch."""
  tokenizer = tokenizer_training.ensure_tokenizer(config)
  config = tokenizer_lib.complete_config(config, tokenizer)
  data = pipeline.prepare(config, tokenizer)
  mesh = sharding.make_mesh(config.mesh.shape)
  model = trainer.build_model(config)
  optimizer = trainer.make_optimizer(config, model)
  state, state_sh = trainer.create_state(model, optimizer, config, mesh, jax.random.key(0))
  step = trainer.make_train_step(model, optimizer, config, mesh, state_sh, len(data.task_names))
  batch = trainer.global_batch(next(data.train_iterator()), config, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    compiled = step.jitted.lower(state, batch).compile()
  for _ in range(2):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / steps


def run(preset: str = "tiny", steps: int = 20, data_dir: str | None = None,
        batch_size: int | None = None) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    config = _config(preset, steps, data_dir or os.path.join(tmp, "data"), batch_size)
    workdir = pathlib.Path(tmp) / "run"
    training.train_and_evaluate(config, str(workdir))
    entries = [json.loads(line) for line in (workdir / "train_log.jsonl").read_text()
               .splitlines()]
    loop_s = int(config.train.batch_size) / entries[-1]["examples_per_s"]
    step_s = compiled_step_s(config, steps)
  return dict(preset=preset, batch_size=int(config.train.batch_size), steps=steps,
              loop_step_s=loop_s, compiled_step_s=step_s, ratio=loop_s / step_s,
              load_average=os.getloadavg())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--steps", type=int, default=20, help="steps per timed interval")
  parser.add_argument("--batch_size", type=int, default=None)
  parser.add_argument("--data_dir", default=None, help="default: a temporary directory")
  args = parser.parse_args()
  r = run(args.preset, args.steps, args.data_dir, args.batch_size)
  print(f"loop {r['loop_step_s'] * 1e3:.1f} ms/step, compiled step {r['compiled_step_s'] * 1e3:.1f}"
        f" ms: {r['ratio']:.2f}x (target <= 1.1x), load average {r['load_average'][0]:.1f}")
  print(json.dumps(r))


if __name__ == "__main__":
  main()
