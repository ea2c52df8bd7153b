"""Runs 3 train steps of the tiny model on a 2x2x2 mesh and prints the losses as JSON.

  python tests/multihost_step.py single              # one process, 8 local CPU devices
  python tests/multihost_step.py PORT PROCESS_ID     # one of two processes, 4 devices each

Each process feeds only its own rows of the global batch (as per-process data loading does).
"""

import json
import os
import sys

_MULTI = len(sys.argv) == 3
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 if _MULTI else 8}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from model_fixtures import random_batch, tiny_config  # noqa: E402

from earthgptx_jax import sharding, trainer  # noqa: E402


def main():
  if _MULTI:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{sys.argv[1]}", num_processes=2,
                               process_id=int(sys.argv[2]))
  config = tiny_config()
  mesh = sharding.make_mesh((2, 2, 2))
  model = trainer.build_model(config)
  optimizer = trainer.make_optimizer(config, model)
  state, state_sh = trainer.create_state(model, optimizer, config, mesh, jax.random.key(0))
  step = trainer.make_train_step(model, optimizer, config, mesh, state_sh, num_tasks=3)
  b = config.train.batch_size
  rows = slice(jax.process_index() * b // jax.process_count(),
               (jax.process_index() + 1) * b // jax.process_count())
  losses = []
  for i in range(3):
    full = random_batch(config, b, seed=10 + i)
    local = {k: v[rows] for k, v in full.items()}
    state, metrics = step(state, trainer.global_batch(local, config, mesh))
    losses.append(float(metrics["loss"]))
  if jax.process_index() == 0:
    print("LOSSES " + json.dumps(losses), flush=True)


if __name__ == "__main__":
  main()
