"""Test-wide set-up: 8 XLA host devices (sharding tests), the shared real-data folder, the
hypothesis profile (`ci` when the CI variable is set)."""

import os
import pathlib
import tempfile

# Must precede the first `import jax` anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent XLA cache for the session and its subprocesses (training CLIs, multi-process
# runs): the tiny model's steps are compiled once, not once per test process.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(),
                                                                "earthgptx_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI runs the same examples every time (derandomized, no example database), and a failure prints
# the blob that reproduces it; elsewhere hypothesis explores new examples each run. Tests that set
# max_examples themselves keep theirs in both.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True,
                          max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "default")

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """`../shared/data` (real samples, original formats); skipped only outside CI if absent."""
  if not SHARED_DATA.is_dir():
    if os.environ.get("CI"):
      raise FileNotFoundError(f"shared data folder missing in CI: {SHARED_DATA}")
    pytest.skip(f"real-data folder {SHARED_DATA} not present")
  return SHARED_DATA
