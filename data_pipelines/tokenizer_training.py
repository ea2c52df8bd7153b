"""The run's tokenizer: the one at model.llm.tokenizer_path, or the project's own byte-level BPE
trained on the synthetic conversations (the tiny preset and tests: no hub here)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import ml_collections

from data_pipelines import builders, schema, sources
from earthgptx_jax import template
from earthgptx_jax import tokenizer as tokenizer_lib


def ensure_tokenizer(config: ml_collections.ConfigDict):
  """model.llm.tokenizer_path if set; else the project tokenizer trained on the synthetic text
  (built once next to the synthetic data)."""
  path = config.model.llm.get("tokenizer_path", None)
  if path:
    return tokenizer_lib.load_tokenizer(os.path.expanduser(path))
  pretrained = config.model.llm.get("pretrained_path", None)
  if pretrained:  # the project's tokenizer would silently give the LLM's weights other ids
    raise ValueError(f"model.llm.tokenizer_path: unset while model.llm.pretrained_path="
                     f"{pretrained!r} is set; give the pretrained LLM's own tokenizer (an HF "
                     f"folder, usually the same one)")
  folder = os.path.join(sources.source_data_dir(config, "synthetic_rs/optical"),
                        f"tokenizer_{int(config.model.llm.vocab_size)}")
  with builders.exclusive(folder):  # one builder among concurrent processes
    if not os.path.exists(os.path.join(folder, "tokenizer.json")):
      builders.ensure_synthetic(config.data.data_dir, config)
      tokenizer_lib.build_tokenizer(list(synthetic_texts(config)),
                                    int(config.model.llm.vocab_size), folder)
  return tokenizer_lib.load_tokenizer(folder)


def synthetic_texts(config: ml_collections.ConfigDict) -> Iterator[str]:
  """Every rendered conversation turn of the synthetic train split (tokenizer corpus)."""
  for modality in schema.MODALITIES:
    dataset = f"synthetic_rs/{modality}"
    source = builders.data_source(dataset, "train", sources.source_data_dir(config, dataset),
                                  synthetic_config=config.data.synthetic)
    for i in range(len(source)):
      turns = [t.decode("utf-8") for t in source[i]["turns"]]
      for segment in template.render_conversation(turns, modality):
        yield segment.text
