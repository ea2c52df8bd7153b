"""How much of each parameter group's gradient does each loss term give?

    python docs/probes/loss_gradients.py --workdir=DIR [--batches=N] [--fresh_init]

Draws N batches of the whole task mixture from DIR's train split (the alignment stage skipped)
and differentiates each weighted loss term of `config.loss` (answer CE, mask BCE and Dice, box
L1, gIoU and centre-cell CE) on its own, then the weighted total (what the step clips to
`train.grad_clip_norm` and hands to AdamW), and prints the mean gradient norm by top-level
parameter group (vision encoders, integration, LLM, box head, ...). A term whose norm in a group
is many times the answer CE's decides that group's updates. `--fresh_init` probes the same
architecture at initialisation. Read-only. Results: docs/experiments.md, "K0-K2".
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from earthgptx_jax import tasks, trainer

import probe_workdir


def _norm(tree) -> float:
  return float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--batches", type=int, default=6)
  parser.add_argument("--fresh_init", action="store_true")
  args = parser.parse_args()
  if args.batches < 1:
    parser.error(f"--batches: {args.batches} is not a positive count")
  def mixture_only(config):
    config.train.alignment_steps = 0  # the mixture, where every term is present
  config, data, model, params = probe_workdir.model_and_data(parser, args.workdir,
                                                             args.fresh_init, mixture_only)
  batches = data.train_iterator()
  trainable = {"params": params, "lora": {}}
  terms = tuple(config.loss.keys())

  def gradients(trainable, batch):
    def weighted(trainable, name):
      total, metrics = trainer.compute_losses(model, config, trainable, batch, len(tasks.NAMES))
      return total if name == "total" else config.loss[name] * metrics[name]
    return {name: jax.grad(weighted)(trainable, name)["params"] for name in (*terms, "total")}

  gradients = jax.jit(gradients)
  groups = sorted(params)
  norms = {}
  for _ in range(args.batches):
    for name, grads in gradients(trainable, next(batches)).items():
      norms.setdefault((name, "all"), []).append(_norm(grads))
      for group in groups:
        norms.setdefault((name, group), []).append(_norm(grads[group]))
  weights = ", ".join(f"{name} {config.loss[name]:g}" for name in terms)
  at = " at initialisation" if args.fresh_init else ""
  print(f"{args.workdir}{at}: mean gradient norm over {args.batches} mixture batches "
        f"(weights {weights}; clip {config.train.grad_clip_norm:g})")
  columns = ("all", *groups)
  print("term".ljust(10) + "".join(c[:13].rjust(14) for c in columns))
  for name in (*terms, "total"):
    print(name.ljust(10) + "".join(f"{np.mean(norms[(name, c)]):14.3f}" for c in columns))


if __name__ == "__main__":
  main()
