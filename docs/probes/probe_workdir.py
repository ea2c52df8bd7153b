"""What the probes in this folder start from: a training workdir's model, read-only, or the same
architecture freshly initialised (their `--fresh_init`)."""

import argparse
from collections.abc import Callable

import jax
from flax import linen as nn

from data_pipelines import pipeline
from earthgptx_jax import predictor
from earthgptx_jax import trainer


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


def model_and_data(parser: argparse.ArgumentParser, workdir: str, fresh_init: bool,
                   configure: Callable[..., None] = lambda config: None):
  """(config, data, model, params) of `workdir`, its data prepared as `evaluate` does (built into
  the data folder when missing, never into the workdir); `configure` edits the config first;
  `fresh_init` swaps the trained params for initial ones."""
  config, tokenizer, params = load(parser, workdir)
  configure(config)
  data = pipeline.prepare(config, tokenizer)
  model = trainer.build_model(config)
  if fresh_init:
    params = fresh_params(model, data)
  return config, data, model, params
