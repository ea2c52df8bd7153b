"""What the probes in this folder start from: a training workdir's model, read-only, or the same
architecture freshly initialised (their `--fresh_init`)."""

import argparse

import jax
from flax import linen as nn

from earthgptx_jax import predictor


def load(parser: argparse.ArgumentParser, workdir: str):
  """(config, tokenizer, params) of `workdir`; a folder that is not a usable workdir ends the
  probe with the parser's one-line error."""
  try:
    return predictor.load_workdir(workdir)
  except predictor.InferenceError as e:
    parser.error(str(e))


def fresh_params(model, data):
  """`model`'s params at initialisation (key 0), shaped by one held-out batch of `data`; plain
  arrays, as a workdir's are (code that reads a kernel directly cannot take a boxed one)."""
  first = next(iter(data.eval_iterator(max_examples=8)))
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), first.batch)["params"])
