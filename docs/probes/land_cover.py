"""Do the image tokens the LLM receives say the land cover, and does the LLM read it?

    python docs/probes/land_cover.py --workdir=DIR [--fresh_init]

Runs DIR's model on the train and held-out splits' scene-classification and image-caption
examples (both answers start with the land cover), flattens the global view's image tokens as the
LLM gets them (`EarthGPTX.encode_visual`'s image_llm) and the vision encoders' tokens before the
integration block, and fits one-vs-rest ridge regression from each to the land cover on the train
examples, scoring the held-out ones by sensor; the mean pixel of the view is the baseline.
Compare with `evaluate`'s scene accuracy: a linear read-out that beats the LLM's answers means
the LLM is not reading what its input holds. `--fresh_init` probes the architecture at
initialisation. Read-only. Results: docs/experiments.md, "K0-M2".
"""

import argparse

import jax
import numpy as np

from data_pipelines import synthetic

import linear_readout
import probe_workdir

_SENSORS = ("optical", "sar", "infrared")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--fresh_init", action="store_true")
  args = parser.parse_args()
  config, data, model, params = probe_workdir.model_and_data(parser, args.workdir,
                                                             args.fresh_init)

  def tokens(module, batch):
    return module.vision(batch["pixel_values"]).tokens, module.encode_visual(batch).image_llm

  encode = jax.jit(lambda p, b: model.apply({"params": p}, b, method=tokens))

  def collect(split, limit):
    rows = {"pixels": [], "encoders": [], "llm input": [], "label": [], "sensor": []}
    for eb in data.eval_iterator(split=split, max_examples=limit, max_per_task=0):
      encoders, llm = (np.asarray(a) for a in encode(params, eb.batch))
      per_view = encoders.shape[1] // eb.batch["pixel_values"].shape[1]
      for i, record in enumerate(eb.records):
        if record is None or record.task not in ("scene_classification", "image_caption"):
          continue
        rows["label"].append(synthetic.LAND_COVER.index(record.turns[1].split(" ")[0]))
        rows["sensor"].append(record.modality)
        rows["pixels"].append(eb.batch["pixel_values"][i, 0].reshape(-1, 3).mean(0))
        rows["encoders"].append(encoders[i, :per_view].reshape(-1))
        rows["llm input"].append(llm[i, :per_view].reshape(-1))
    return {k: np.asarray(v) for k, v in rows.items()}

  fit, test = collect("train", 3000), collect(config.data.eval_split, 1200)
  print(f"land cover of {len(fit['label'])} train / {len(test['label'])} held-out images, "
        f"ridge one-vs-rest, held-out accuracy:")
  onehot = np.eye(len(synthetic.LAND_COVER))[fit["label"]]
  for features in ("pixels", "encoders", "llm input"):
    scores = linear_readout.ridge_fit_predict(fit[features], onehot, test[features])
    right = scores.argmax(1) == test["label"]
    by_sensor = ", ".join(f"{s} {right[test['sensor'] == s].mean():.3f}" for s in _SENSORS)
    print(f"  {features} ({fit[features].shape[1]} features): {right.mean():.3f} ({by_sensor})")


if __name__ == "__main__":
  main()
