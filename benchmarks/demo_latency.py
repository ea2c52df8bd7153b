"""The browser demo's latency as its user sees it: first streamed token and full answer, over HTTP.

    python -m benchmarks.demo_latency                       # random tiny weights (no training)
    python -m benchmarks.demo_latency --workdir=workdir/tiny  # a trained run

Starts `python -m earthgptx_jax.demo` as a user does, picks each bundled example (optical,
SAR, infrared), draws a box and asks about it through the page's own endpoints, and times
from sending the question to the first token event and to the final answer (boxes, masks and
the overlay drawn). The first question compiles the model ("cold", reported apart); then the
median of --reps questions per modality ("warm"). Random weights rarely stop early, so their
answers run the full --max_new_tokens: a worst case for the full-answer time. JSON goes to
benchmarks/results/demo_latency.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import jax

from benchmarks.infer_latency import TEXTS
from tests.model_fixtures import random_workdir

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _post(url: str, body: bytes = b"") -> urllib.request.Request:
  return urllib.request.Request(url, data=body, method="POST",
                                headers={"Content-Type": "application/json"})


def ask(url: str, session: str, modality: str, box) -> tuple[float, float, int]:
  """(seconds to the first token event, seconds to the answer, token events) of one question."""
  body = json.dumps(dict(session=session, modality=modality, text="What is inside <vp1>?",
                         prompts=[{"kind": "box", "points": box}])).encode()
  start = time.perf_counter()
  first, tokens, buffer = None, 0, b""
  with urllib.request.urlopen(_post(f"{url}/api/ask", body), timeout=900) as r:
    for line in r:  # server-sent events, read as they arrive
      buffer += line
      if not buffer.endswith(b"\n\n"):
        continue
      event, buffer = json.loads(buffer.decode()[len("data: "):]), b""
      if event["type"] == "token":
        tokens += 1
        first = first or time.perf_counter() - start
      elif event["type"] == "done":
        return first or float("nan"), time.perf_counter() - start, tokens
      else:
        raise RuntimeError(f"the demo refused the question: {event}")
  raise RuntimeError("the answer stream ended without an answer")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", help="a training workdir (default: random tiny weights)")
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or str(random_workdir(pathlib.Path(tmp), TEXTS)[0])
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "earthgptx_jax.demo", f"--workdir={workdir}",
                             "--port=0", f"--max_new_tokens={args.max_new_tokens}"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
      url = next(line.split()[3].rstrip("/") for line in proc.stdout
                 if line.startswith("demo: serving on "))
      startup = time.perf_counter() - started
      with urllib.request.urlopen(_post(f"{url}/api/session")) as r:
        session = json.load(r)["session"]
      rows, cold = {}, None
      for modality in ("optical", "sar", "infrared"):
        with urllib.request.urlopen(_post(f"{url}/api/example?session={session}"
                                          f"&modality={modality}")) as r:
          size = json.load(r)
        box = [[size["width"] * 0.25, size["height"] * 0.25],
               [size["width"] * 0.75, size["height"] * 0.75]]
        if cold is None:
          cold = ask(url, session, modality, box)
        runs = [ask(url, session, modality, box) for _ in range(args.reps)]
        rows[modality] = dict(
            first_token_s=statistics.median(r[0] for r in runs),
            full_answer_s=statistics.median(r[1] for r in runs),
            token_events=statistics.median(r[2] for r in runs))
    finally:
      proc.terminate()
      proc.wait()
  result = dict(workdir=args.workdir or "random tiny weights", device=str(jax.devices()[0]),
                max_new_tokens=args.max_new_tokens, reps=args.reps, startup_s=startup,
                cold=dict(first_token_s=cold[0], full_answer_s=cold[1], token_events=cold[2]),
                warm=rows)
  print(f"demo latency ({result['workdir']}, max_new_tokens={args.max_new_tokens}, "
        f"{result['device']}); start-up (load) {startup:.1f} s")
  print(f"  cold (compiles): first token {cold[0]:.2f} s, full answer {cold[1]:.2f} s")
  print(f"  {'warm, median':14s} {'first token':>12s} {'full answer':>12s} {'tokens':>7s}")
  for modality, row in rows.items():
    print(f"  {modality:14s} {row['first_token_s'] * 1e3:10.0f}ms "
          f"{row['full_answer_s'] * 1e3:10.0f}ms {row['token_events']:7.0f}")
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "demo_latency.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
