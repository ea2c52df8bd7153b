"""Which part of a relation answer does a trained model get right?

    python docs/probes/relation_answers.py --workdir=DIR [--max_examples=N]

Generates DIR's model's answers on the held-out relation-reasoning examples ("the <class> is
<relation> the <class>") and scores each part on its own: the first class, the relation word, the
second class, and the whole answer (the task's exact-match accuracy), beside how often each
relation word is answered and the majority word's share. Read-only. Results:
docs/experiments.md, "R0-R1".
"""

import argparse
import collections
import re

from data_pipelines import pipeline
from earthgptx_jax import evaluation

import probe_workdir

_ANSWER = re.compile(r"the (.+) is (left of|right of|above|below) the (.+)")


def _parts(text: str) -> tuple[str, str, str] | None:
  match = _ANSWER.fullmatch(" ".join(text.lower().split()))
  return match.groups() if match else None


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--max_examples", type=int, default=None)
  args = parser.parse_args()
  config, tokenizer, params = probe_workdir.load(parser, args.workdir)
  data = pipeline.prepare(config, tokenizer)
  samples = [s for s in evaluation.generate_samples(params, config, data,
                                                    max_examples=args.max_examples)
             if s.task == "relation_reasoning"]
  right = collections.Counter()
  answered = collections.Counter()
  truth = collections.Counter()
  for s in samples:
    want, got = _parts(s.references[0]), _parts(s.answer)
    truth[want[1]] += 1
    answered[got[1] if got else "(not the form)"] += 1
    right["whole"] += got == want
    if got:
      for i, part in enumerate(("first class", "relation word", "second class")):
        right[part] += got[i] == want[i]
  n = len(samples)
  print(f"{n} held-out relation examples")
  for part in ("first class", "relation word", "second class", "whole"):
    print(f"  {part}: {right[part] / n:.3f}")
  print(f"  answered words: {dict(answered)}; majority word's share "
        f"{max(truth.values()) / n:.3f} ({dict(truth)})")


if __name__ == "__main__":
  main()
