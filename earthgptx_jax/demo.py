r"""A browser demo of a trained EarthGPT-X: draw prompts on an image, ask, see boxes and masks.

  python -m earthgptx_jax.demo --workdir=workdir/tiny [--port=7860]

then open http://127.0.0.1:7860 . Upload an image (PNG/JPEG/TIFF, 8/16-bit, 1..N bands) or
pick a synthetic optical / SAR / infrared example, choose its modality, draw points (click),
boxes (drag) and scribbles (brush), each named <vpN> in the question, and chat. The server is
earthgptx_jax/demo_server.py; requests go through the same Predictor as infer.
"""

from __future__ import annotations

from earthgptx_jax import host_memory

if __name__ == "__main__":  # before the imports below, which it would repeat: it restarts
  host_memory.reexec_with_huge_page_malloc()  # the process with huge-page malloc

import sys

from absl import app, flags

from earthgptx_jax import cli, demo_server, paths
from earthgptx_jax.predictor import InferenceError, Predictor

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json, tokenizer/, "
                               "checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest usable one).")
_PORT = flags.DEFINE_integer("port", 7860, "Port on 127.0.0.1 (0: any free one).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Answer length limit.")

_GET_ONE = ("train one first (minutes on a CPU), e.g.\n  python -m earthgptx_jax.train "
            "--config=configs/fusion.py:tiny --workdir=workdir/tiny\nthen run\n  python -m "
            "earthgptx_jax.demo --workdir=workdir/tiny")


def main(argv):
  del argv
  cli.quiet_library_logs()
  try:
    paths.resolve_flags("workdir")
    cli.use_workdir_compilation_cache(_WORKDIR.value)
    if not _WORKDIR.value:
      raise InferenceError("--workdir: required")
    if _MAX_NEW.value < 1:
      raise InferenceError(f"--max_new_tokens: must be >= 1, got {_MAX_NEW.value}")
    predictor = Predictor.from_workdir(_WORKDIR.value, _STEP.value)
  except (InferenceError, ValueError, OSError) as e:
    print(f"error: {e}\nThe demo needs a trained workdir: {_GET_ONE}", file=sys.stderr)
    sys.exit(2)
  demo = demo_server.Demo(predictor, max_new_tokens=_MAX_NEW.value)
  try:
    server = demo_server.make_server(demo, _PORT.value)
  except OSError as e:
    print(f"error: --port {_PORT.value}: {e.strerror or e}", file=sys.stderr)
    sys.exit(2)
  # The line tests and scripts wait for; flushed, since stdout may be a pipe.
  print(f"demo: serving on http://127.0.0.1:{server.server_port}/ (Ctrl-C stops)", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


if __name__ == "__main__":
  app.run(main)
