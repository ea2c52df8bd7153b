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
from flax import linen as nn  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from model_fixtures import random_batch, tiny_config  # noqa: E402

from earthgptx_jax import sharding, trainer  # noqa: E402


def main():
  if _MULTI:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{sys.argv[1]}", num_processes=2,
                               process_id=int(sys.argv[2]))
  config = tiny_config(flat_optimizer=False)  # moments sharded like the params
  mesh = sharding.make_mesh((2, 2, 2))
  model = trainer.build_model(config)
  optimizer = trainer.make_optimizer(config, model)
  state, state_sh = trainer.create_state(model, optimizer, config, mesh, jax.random.key(0))
  step = trainer.make_train_step(model, optimizer, config, mesh, state_sh, num_tasks=3)
  b = config.train.batch_size
  rows = slice(jax.process_index() * b // jax.process_count(),
               (jax.process_index() + 1) * b // jax.process_count())
  batches = [trainer.global_batch({k: v[rows] for k, v in random_batch(config, b, 10 + i).items()},
                                  config, mesh) for i in range(3)]
  if _MULTI:  # as train.py does: no process runs the step before every process compiled it
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
      step.jitted.lower(state, batches[0]).compile()
    sharding.wait_for_all_processes("train step compiled")
  losses, tokens = [], []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
    tokens.append(int(metrics["tokens"]))  # as training.py counts tokens: the global figure
  if jax.process_index() == 0:
    print("LOSSES " + json.dumps(losses), flush=True)
    print("TOKENS " + json.dumps(tokens), flush=True)


if __name__ == "__main__":
  main()
