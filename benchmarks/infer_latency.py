"""`infer`'s latency as its user sees it: one CLI call, cold and warm, and a loaded model's first
token and full answer.

    python -m benchmarks.infer_latency                        # random tiny weights
    python -m benchmarks.infer_latency --workdir=workdir/tiny   # a trained run

The CLI: `python -m earthgptx_jax.infer --workdir=W --image=... --text=... --box=... --out=PNG`
as a subprocess, the workdir's XLA cache empty for the first call ("cold": every program is
compiled) and filled for the --reps calls after it ("warm", the median: what a second call
costs, issue 23's target <= 5 s). A given --workdir keeps its own cache (cold is then only as
cold as it is). In process, a loaded Predictor (after one warm-up question, outside the
timings): the first streamed token (`Predictor.stream`) and the full answer (`predict`: text,
boxes and masks), medians over --reps. Random weights rarely stop early, so their answers run
the full --max_new_tokens: a worst case for the full answer. Each figure comes with the load
average it was taken under, and each CLI call with its CPU seconds, which other processes on a
shared machine inflate far less than its wall time. JSON: benchmarks/results/infer_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from tests.model_fixtures import random_workdir

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
IMAGE = ROOT.parent / "shared" / "data" / "SIRST" / "images" / "Misc_10.png"
TEXTS = ["what is in the region? a ship near the plane", "segment the storage tank",
         "[12,40,300,512] the building is left of the vehicle"] * 20
QUESTION = dict(modality="infrared", text="What is inside <vp1>?", box="10,10,60,50")


def tiny_workdir(root: pathlib.Path) -> pathlib.Path:
  """A tiny-preset workdir with random weights whose XLA cache is root/xla_cache (empty)."""

  def configure(config):
    config.train.compilation_cache_dir = str(root / "xla_cache")
  return random_workdir(root, TEXTS, configure)[0]


def _image(root: pathlib.Path) -> pathlib.Path:
  """The shared SIRST sample, or a synthetic grey image where the data folder is absent."""
  if IMAGE.is_file():
    return IMAGE
  import numpy as np
  from PIL import Image
  path = root / "scene.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256), np.uint8)).save(path)
  return path


def cli_call(workdir: pathlib.Path, image: pathlib.Path, out: pathlib.Path,
             max_new_tokens: int) -> dict:
  """One `infer` subprocess: wall seconds, its CPU seconds (user + system: what it costs
  whatever else runs on the machine) and the load average before it."""
  load = os.getloadavg()[0]
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  proc = subprocess.run(
      [sys.executable, "-m", "earthgptx_jax.infer", f"--workdir={workdir}", f"--image={image}",
       f"--modality={QUESTION['modality']}", f"--text={QUESTION['text']}",
       f"--box={QUESTION['box']}", f"--out={out}", f"--max_new_tokens={max_new_tokens}"],
      capture_output=True, text=True, check=False, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
          [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])))
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode:
    raise RuntimeError(f"infer failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
  return dict(wall_s=wall, cpu_s=cpu, load_before=load)


def in_process(workdir: pathlib.Path, image: pathlib.Path, max_new_tokens: int,
               reps: int) -> dict:
  """A loaded Predictor: (first streamed token, full answer) medians over `reps`."""
  from earthgptx_jax import cli
  from earthgptx_jax import predictor as predictor_lib
  cli.use_workdir_compilation_cache(str(workdir))
  start = time.perf_counter()
  predictor = predictor_lib.Predictor.from_workdir(workdir)
  load_s = time.perf_counter() - start
  record = predictor_lib.request_record(
      image.read_bytes(), QUESTION["modality"], QUESTION["text"],
      [predictor_lib.parse_prompt_flag("box", QUESTION["box"])])
  kwargs = dict(max_new_tokens=max_new_tokens)
  first_answer = _timed_full(predictor, record, kwargs)  # compiles (or loads) the programs
  list(predictor.stream(record, **kwargs))  # the streaming loop compiles apart (host callback)
  firsts, fulls = [], []
  for _ in range(reps):
    start = time.perf_counter()
    first = None
    for item in predictor.stream(record, **kwargs):
      first = first or time.perf_counter() - start
    firsts.append(first)
    fulls.append(_timed_full(predictor, record, kwargs)[0])
  return dict(load_s=load_s, first_call_s=first_answer[0], first_token_s=statistics.median(
      firsts), full_answer_s=statistics.median(fulls), load_average=os.getloadavg()[0])


def _timed_full(predictor, record, kwargs):
  start = time.perf_counter()
  answer = predictor.predict([record], **kwargs)[0]
  return time.perf_counter() - start, answer


def run(workdir: str | None = None, *, max_new_tokens: int = 64, reps: int = 3) -> dict:
  """Every figure of this benchmark (see the module docstring)."""
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    wd = pathlib.Path(workdir) if workdir else tiny_workdir(root)
    image = _image(root)
    cold = cli_call(wd, image, root / "overlay.png", max_new_tokens)
    warm = [cli_call(wd, image, root / "overlay.png", max_new_tokens) for _ in range(reps)]
    loaded = in_process(wd, image, max_new_tokens, reps)
  return dict(workdir=workdir or "random tiny weights", max_new_tokens=max_new_tokens, reps=reps,
              cpus=os.cpu_count(), cli_cold=cold,
              cli_warm=dict(wall_s=statistics.median(r["wall_s"] for r in warm),
                            cpu_s=statistics.median(r["cpu_s"] for r in warm), runs=warm),
              predictor=loaded)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", help="a training workdir (default: random tiny weights)")
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--reps", type=int, default=3)
  args = parser.parse_args()
  r = run(args.workdir, max_new_tokens=args.max_new_tokens, reps=args.reps)
  p = r["predictor"]
  print(f"infer latency ({r['workdir']}, max_new_tokens={r['max_new_tokens']}, {r['cpus']} CPUs)")
  print(f"  CLI cold (compiles): {r['cli_cold']['wall_s']:.1f} s wall, "
        f"{r['cli_cold']['cpu_s']:.1f} s CPU (load {r['cli_cold']['load_before']:.1f})")
  print(f"  CLI warm, median of {r['reps']}: {r['cli_warm']['wall_s']:.1f} s wall, "
        f"{r['cli_warm']['cpu_s']:.1f} s CPU (loads "
        + ", ".join(f"{w['load_before']:.1f}" for w in r["cli_warm"]["runs"]) + ")")
  print(f"  loaded Predictor: first token {p['first_token_s'] * 1e3:.0f} ms, full answer "
        f"{p['full_answer_s'] * 1e3:.0f} ms (load {p['load_average']:.1f})")
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "infer_latency.json").write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
  main()
