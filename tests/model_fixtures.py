"""Tiny full-model configs and random batches that honour the batch contract (batch.py).

Independent of the data pipeline, so model/trainer tests pin the model alone.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from configs import fusion
from earthgptx_jax import batch as batch_lib
from earthgptx_jax import export, trainer
from earthgptx_jax import tokenizer as tokenizer_lib


def tiny_config(**train_overrides):
  config = fusion.get_config("tiny")
  vocab = config.model.llm.vocab_size
  # The trainer takes these from the tokenizer; tests reserve the last ids of the vocabulary.
  config.model.token_ids.box = vocab - 4
  config.model.token_ids.image_patch = vocab - 3
  config.model.token_ids.vp_patch = vocab - 2
  config.model.token_ids.seg = vocab - 1
  config.model.token_ids.update(dict(bos=1, eos=2, pad=0))
  config.train.update(train_overrides)
  return config


def random_batch(config, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Images, two prompts, text with spliced placeholders, answer loss, one [SEG] + mask and one
  [BOX] + box each."""
  rng = np.random.default_rng(seed)
  b = batch_lib.example_batch(config, batch_size)
  ids = config.model.token_ids
  vocab = config.model.llm.vocab_size
  views = b["pixel_values"].shape[1]
  n_image = views * config.model.vision.token_grid ** 2
  k = config.model.prompt.tokens_per_prompt
  length = config.data.max_length
  s = config.model.vision.image_size
  b["pixel_values"][:] = rng.uniform(0, 1, b["pixel_values"].shape)
  b["view_valid"][:] = True
  b["view_valid"][:, -1] = rng.uniform(size=batch_size) < 0.5
  for i in range(batch_size):
    n_prompts = 1 + i % config.model.prompt.max_prompts
    tokens = [1]  # BOS
    tokens += [ids.image_patch] * n_image
    vp_index = [-1] * len(tokens)
    for p in range(n_prompts):
      x1, y1 = rng.integers(0, config.model.prompt.map_size // 2, 2)
      x2, y2 = x1 + rng.integers(2, 10), y1 + rng.integers(2, 10)
      b["prompt_maps"][i, p, y1:y2, x1:x2] = 1.0
      b["prompt_geometry"][i, p] = np.array([x1, y1, x2, y2]) / config.model.prompt.map_size
      b["prompt_type"][i, p] = p % 3
      b["prompt_valid"][i, p] = True
      tokens += [ids.vp_patch] * k
      vp_index += [p * k + j for j in range(k)]
    question = list(rng.integers(3, vocab - 10, 12))
    answer = list(rng.integers(3, vocab - 10, 6)) + [ids.box, ids.seg, 2]  # ..., [BOX], [SEG], EOS
    prompt_len = len(tokens) + len(question)
    tokens += question + answer
    vp_index += [-1] * (len(question) + len(answer))
    n = len(tokens)
    b["input_ids"][i, :n] = tokens
    b["attention_mask"][i, :n] = True
    if not b["view_valid"][i, -1]:
      per_view = config.model.vision.token_grid ** 2
      b["attention_mask"][i, 1 + (views - 1) * per_view:1 + n_image] = False
    b["targets"][i, :n - 1] = tokens[1:]
    b["loss_mask"][i, prompt_len - 1:n - 1] = True
    b["vp_token_index"][i, :n] = vp_index
    y0, x0 = rng.integers(0, s // 2, 2)
    b["seg_masks"][i, 0, y0:y0 + s // 4, x0:x0 + s // 4] = 1.0
    b["seg_valid"][i, 0] = True
    corner = rng.uniform(0, 0.6, 2)
    b["box_targets"][i, 0] = [*corner, *(corner + rng.uniform(0.1, 0.4, 2))]
    b["box_valid"][i, 0] = True
  b["image_size"][:] = s
  b["task_id"][:] = np.arange(batch_size) % 3
  assert length >= n
  return b


def random_workdir(root: pathlib.Path, texts: Sequence[str],
                   configure: Callable | None = None):
  """A tiny workdir with random weights, written as training writes one, under root/run, with a
  tokenizer trained on `texts`; `configure(config)` adjusts the config before it is saved.
  Returns (workdir, config, tokenizer)."""
  tok_dir = root / "tok"
  tokenizer_lib.build_tokenizer(list(texts), 300, str(tok_dir))
  tokenizer = tokenizer_lib.load_tokenizer(str(tok_dir))
  config = tiny_config()
  config.model.token_ids = type(config.model.token_ids)(
      tokenizer_lib.special_token_ids(tokenizer))
  config.data.data_dir = str(root / "data")
  if configure is not None:
    configure(config)
  model = trainer.build_model(config)
  example = jax.tree.map(jnp.asarray, batch_lib.example_batch(config, 1))
  shapes = trainer.nn.meta.unbox(jax.eval_shape(
      lambda: model.init(jax.random.key(0), example)["params"]))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
  wd = root / "run"
  export.save_workdir(config, {"params": params, "lora": {}}, wd, tokenizer_dir=tok_dir)
  return wd, config, tokenizer
