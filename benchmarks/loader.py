"""Loader throughput at paper-preset sizes: examples/s (and per worker core), 0 vs N workers.

  python -m benchmarks.loader [--workers=0,2] [--batches=20] [--data_dir=/tmp/bench_data]

Settings: paper preset with 3 views of 448 px (global + 2 tiles), 2 visual prompts, 512 text
tokens (token_grid 12 so image tokens fit), synthetic_rs at paper image sizes (256-640 px,
all sensors mixed). The tokenizer is the small test BPE (tests/data_fixtures.py): tokenising a
few hundred tokens is a small part of an example's cost either way.
"""

import os
import time

from absl import app, flags

_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "worker process counts to measure")
_BATCHES = flags.DEFINE_integer("batches", 20, "batches timed per setting (after 2 warm-up)")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "examples per batch")
_DATA_DIR = flags.DEFINE_string("data_dir", "/tmp/earthgptx_bench_data", "synthetic data dir")


def bench_config():
  from configs import fusion
  config = fusion.get_config("paper")
  config.model.vision.max_tiles = 2  # 3 views
  config.model.vision.token_grid = 12  # 432 image tokens
  config.model.prompt.max_prompts = 2
  config.data.max_length = 512
  config.data.data_dir = _DATA_DIR.value
  config.data.synthetic.num_train = 200
  config.data.synthetic.num_eval = 8
  config.train.batch_size = _BATCH_SIZE.value
  return config


def examples_per_second(it, batches: int, batch_size: int, warmup: int = 2) -> float:
  """Examples/s of a batch iterator over `batches` batches after `warmup` (workers start)."""
  for _ in range(warmup):
    next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch_size / (time.perf_counter() - t0)


def main(argv):
  del argv
  from data_pipelines import builders, pipeline, tokenizer_training
  from tests.data_fixtures import make_test_tokenizer
  config = bench_config()
  t0 = time.perf_counter()
  builders.ensure_synthetic(config.data.data_dir, config)
  print(f"synthetic data ready in {time.perf_counter() - t0:.1f} s")
  tokenizer = make_test_tokenizer(list(tokenizer_training.synthetic_texts(config)), vocab_size=2000)
  print(f"cpu cores visible: {os.cpu_count()}")
  for workers in (int(w) for w in _WORKERS.value):
    config.data.num_workers = workers
    it = pipeline.make_train_iterator(config, tokenizer)
    rate = examples_per_second(it, _BATCHES.value, config.train.batch_size)
    per_core = rate / max(workers, 1)
    print(f"workers={workers}: {rate:.1f} examples/s ({per_core:.1f} per worker process), "
          f"{1000 / rate:.1f} ms/example, bad records {it.bad_records}")
    it.close()


if __name__ == "__main__":
  app.run(main)
