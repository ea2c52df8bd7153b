"""What the TPU / GPU recipe needs before training starts (README "Installing for TPU / GPU")."""

from __future__ import annotations

import pathlib
import re

import pytest

from data_pipelines import tokenizer_training
from tests.model_fixtures import tiny_config



@pytest.fixture(scope="module")
def setup_kwargs():
  """setup.py's arguments to setuptools.setup (run with setup replaced by a recorder)."""
  import setuptools
  seen = {}
  path = pathlib.Path(__file__).resolve().parents[1] / "setup.py"
  original = setuptools.setup
  setuptools.setup = lambda **kw: seen.update(kw)
  try:
    exec(compile(path.read_text(), str(path), "exec"), {"__name__": "setup"})
  finally:
    setuptools.setup = original
  return seen


def test_pretrained_llm_without_tokenizer_is_an_error():
  config = tiny_config()
  config.model.llm.pretrained_path = "llama-2-7b-hf"
  with pytest.raises(ValueError, match=r"model\.llm\.tokenizer_path: unset while "
                                       r"model\.llm\.pretrained_path='llama-2-7b-hf'"):
    tokenizer_training.ensure_tokenizer(config)


@pytest.mark.parametrize("extra", ["tpu", "gpu"])
def test_accelerator_extras_reach_cloud_storage(setup_kwargs, extra):
  """gs:// workdirs (etils/gcsfs) and TensorBoard event files on GCS (google-cloud-storage)."""
  names = {re.split(r"[\[=<>]", r)[0] for r in setup_kwargs["extras_require"][extra]}
  assert {"gcsfs", "google-cloud-storage", "jax"} <= names


def test_python_and_jax_stack_pinned(setup_kwargs):
  assert setup_kwargs["python_requires"] == ">=3.11"
  pinned = {r.split("==")[0] for r in setup_kwargs["install_requires"] if "==" in r}
  assert {"jax", "flax", "orbax-checkpoint", "grain"} <= pinned
