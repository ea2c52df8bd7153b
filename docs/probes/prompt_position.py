"""Does a trained model's prompt path tell the LLM where each visual prompt is?

    python docs/probes/prompt_position.py --workdir=DIR [--features=llm|encoder] [--fresh_init]

Runs the prompt path of DIR's model on the train and held-out splits, flattens each prompt's
K tokens (`--features=llm`: `EarthGPTX.encode_visual`'s prompt_llm, what the LLM receives;
`encoder`: the prompt encoder's output), and fits on the train prompts, scoring on the held-out
ones: ridge regression to the prompt's box centre (R^2, and a 15-nearest-neighbour R^2 as a
non-linear check), and one-vs-rest ridge from a two-prompt example's [f1, f2, f1 - f2] to the
relation word synthetic_rs's rule gives the two prompts' boxes (a point prompt's box is the point,
so this is a proxy for the answer's word), beside the same read-out from the prompts' centres.
`--fresh_init` probes the same architecture at initialisation. Read-only.
Results and why it matters: docs/experiments.md, "Where a prompt's position goes".
"""

import argparse
import types

import jax
import numpy as np

from data_pipelines import synthetic

import linear_readout
import probe_workdir


RELATION_WORDS = ("left of", "right of", "above", "below")


def _relation(a, b) -> int:
  """Index of the word synthetic_rs's own rule gives two boxes (it reads only `.box`)."""
  return RELATION_WORDS.index(synthetic._relation(types.SimpleNamespace(box=a),
                                                  types.SimpleNamespace(box=b)))


def _r2(pred, target):
  return 1 - ((pred - target) ** 2).sum(0) / ((target - target.mean(0)) ** 2).sum(0)


def _centres(geometry):  # [..., 4] (x1, y1, x2, y2) -> [..., 2]
  return (geometry[..., :2] + geometry[..., 2:]) / 2


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--features", choices=("llm", "encoder"), default="llm")
  parser.add_argument("--fresh_init", action="store_true")
  args = parser.parse_args()

  config, data, model, params = probe_workdir.model_and_data(parser, args.workdir,
                                                             args.fresh_init)

  def prompt_features(module, batch):
    if args.features == "encoder":
      return module.prompt_encoder(batch["prompt_maps"], batch["prompt_geometry"],
                                   batch["prompt_type"], batch["prompt_valid"])
    return module.encode_visual(batch).prompt_llm

  encode = jax.jit(lambda p, b: model.apply({"params": p}, b, method=prompt_features))

  def collect(split, limit):
    feats, geometry, valid = [], [], []
    for eb in data.eval_iterator(split=split, max_examples=limit, max_per_task=0):
      tokens = np.asarray(encode(params, eb.batch))  # [B, P, K, H]
      feats.append(tokens.reshape(*tokens.shape[:2], -1))
      geometry.append(eb.batch["prompt_geometry"])
      valid.append(eb.batch["prompt_valid"] & eb.valid[:, None])
    return np.concatenate(feats), np.concatenate(geometry), np.concatenate(valid)

  (f_fit, g_fit, v_fit), (f_test, g_test, v_test) = (collect("train", 4000),
                                                     collect(config.data.eval_split, 1200))
  print(f"prompts: {int(v_fit.sum())} to fit, {int(v_test.sum())} held out")

  x, y = f_fit[v_fit], _centres(g_fit[v_fit])
  x_test, y_test = f_test[v_test], _centres(g_test[v_test])
  linear = linear_readout.ridge_fit_predict(x, y, x_test)
  print("centre R^2 (x, y), linear:", np.round(_r2(linear, y_test), 3))
  mean, std = x.mean(0), x.std(0) + 1e-6
  a, b = (x - mean) / std, (x_test - mean) / std
  dist = (b ** 2).sum(1)[:, None] - 2 * b @ a.T + (a ** 2).sum(1)[None]
  knn = y[np.argsort(dist, 1)[:, :15]].mean(1)
  print("centre R^2 (x, y), 15-NN:", np.round(_r2(knn, y_test), 3))

  pair_fit, pair_test = v_fit.all(1), v_test.all(1)
  def pair_features(f, m):
    return np.concatenate([f[m, 0], f[m, 1], f[m, 0] - f[m, 1]], 1)
  labels = lambda g, m: np.array([_relation(p, q) for p, q in zip(g[m, 0], g[m, 1])], int)
  word_fit, word_test = labels(g_fit, pair_fit), labels(g_test, pair_test)
  onehot = np.eye(len(RELATION_WORDS))[word_fit]
  from_tokens = linear_readout.ridge_fit_predict(pair_features(f_fit, pair_fit), onehot,
                                                 pair_features(f_test, pair_test)).argmax(1)
  centres = lambda g, m: _centres(g[m]).reshape(int(m.sum()), -1)
  from_centres = linear_readout.ridge_fit_predict(centres(g_fit, pair_fit), onehot,
                                                  centres(g_test, pair_test)).argmax(1)
  majority = np.bincount(word_test, minlength=len(RELATION_WORDS)).max() / len(word_test)
  print(f"relation word on {len(word_test)} held-out pairs, linear: from the tokens "
        f"{(from_tokens == word_test).mean():.3f}, from the true centres "
        f"{(from_centres == word_test).mean():.3f} (majority {majority:.3f})")


if __name__ == "__main__":
  main()
