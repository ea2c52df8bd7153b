"""Caption scores: BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D) from pycocoevalcap over
PTB-tokenised text (both the tokenizer and METEOR run Java)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from earthgptx_jax import answer_metrics

CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


class CaptionScorer:
  """pycocoevalcap's PTB tokenizer and BLEU / METEOR / ROUGE-L / CIDEr scorers.

  Holds one METEOR Java process (its start-up dominates small evaluations), so reuse one
  scorer for many groups and close it (or use it as a context manager) when done.
  """

  def __init__(self):
    self._meteor = None

  def __enter__(self) -> CaptionScorer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self._meteor = None  # pycocoevalcap's Meteor stops its JVM when collected.

  def tokenize(self, captions: Sequence[Sequence[str]]) -> list[list[str]]:
    """PTB-tokenises (lower-cased, punctuation removed) each example's captions."""
    # The tokenizer is line-based: whitespace-only captions are tokenised here.
    request = {i: [{"caption": " ".join(c.split())} for c in caps if c.strip()]
               for i, caps in enumerate(captions)}
    request = {i: caps for i, caps in request.items() if caps}
    tokenized = PTBTokenizer().tokenize(request) if request else {}
    if any(len(tokenized.get(i, [])) != len(caps) for i, caps in request.items()):
      raise RuntimeError("PTB tokenizer returned a different number of captions than it got")
    out = []
    for i, caps in enumerate(captions):
      toks = iter(tokenized.get(i, []))
      out.append([next(toks) if c.strip() else "" for c in caps])
    return out

  def score_tokenized(self, predictions: Sequence[str],
                      references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus scores of tokenised predictions against tokenised references."""
    answer_metrics.check_same_length(predictions, references, "references")
    if not predictions:
      raise ValueError("predictions: caption metrics need at least one caption, got none")
    for i, refs in enumerate(references):
      if not refs:
        raise ValueError(f"references[{i}]: each caption needs at least one reference, got none")
    res = {i: [p] for i, p in enumerate(predictions)}
    gts = {i: list(r) for i, r in enumerate(references)}
    with contextlib.redirect_stdout(io.StringIO()):  # BLEU prints its n-gram counts.
      bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    if self._meteor is None:
      self._meteor = Meteor()
    meteor, _ = self._meteor.compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return dict(zip(CAPTION_METRICS, [*map(float, bleu), float(meteor), float(rouge),
                                      float(cider)]))

  def __call__(self, predictions: Sequence[str],
               references: Sequence[Sequence[str]]) -> dict[str, float]:
    answer_metrics.check_same_length(predictions, references, "references")
    tokenized = self.tokenize([[p, *r] for p, r in zip(predictions, references)])
    return self.score_tokenized([t[0] for t in tokenized], [t[1:] for t in tokenized])


def caption_scores(predictions: Sequence[str],
                   references: Sequence[Sequence[str]]) -> dict[str, float]:
  """BLEU-1..4, METEOR, ROUGE-L, CIDEr of one caption per example against its references."""
  with CaptionScorer() as scorer:
    return scorer(predictions, references)
