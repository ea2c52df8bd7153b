"""Do the image features say which object classes an image holds?

    python docs/probes/object_presence.py --workdir=DIR [--fresh_init]

VQA asks "Is there a ship in the image?" / "How many ships are there?": the answer needs each
class's presence, anywhere in the image. This probe runs DIR's model on the train and held-out
splits' image-caption examples (a caption lists every class with its count, "water with 1 ship
and 2 vehicles") and fits one ridge regression per class from pooled features to "the class is
present", scoring the held-out images per class and by sensor against the majority answer. The
features, each pooled over positions by mean and by max: the global view's ConvNeXt stages, the
vision encoders' tokens and the tokens the LLM receives (`EarthGPTX.encode_visual`'s image_llm).
A class that no feature reads above its majority rate cannot be answered by the LLM either.
`--fresh_init` probes the architecture at initialisation. Read-only. Results: docs/experiments.md,
"N1-N3, F1, B6".
"""

import argparse
import re

import jax
import numpy as np

from data_pipelines import synthetic

import linear_readout
import probe_workdir

_SENSORS = ("optical", "sar", "infrared")


def caption_counts(caption: str, classes) -> list[int]:
  """Per-class counts from a synthetic caption ("water with 1 ship and 2 vehicles")."""
  found = {name: int(n) for n, name in re.findall(r"(\d+) ([a-z ]+?)s?(?=,| and |$)", caption)}
  return [found.get(name, 0) for name in classes]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--fresh_init", action="store_true")
  args = parser.parse_args()
  config, data, model, params = probe_workdir.model_and_data(parser, args.workdir,
                                                             args.fresh_init)
  classes = synthetic.OBJECT_CLASSES[:config.data.synthetic.num_object_classes]

  def features(module, batch):
    vision = module.vision(batch["pixel_values"])
    positions = lambda x: x.reshape(x.shape[0], -1, x.shape[-1])  # [B, h*w, C]
    named = {f"convnext stage {i}": positions(m) for i, m in enumerate(vision.global_stages)}
    named["encoder tokens"] = vision.tokens
    named["LLM input"] = module.encode_visual(batch).image_llm
    return {name: (x.mean(1), x.max(1)) for name, x in named.items()}

  run = jax.jit(lambda p, b: model.apply({"params": p}, b, method=features))

  def collect(split, limit):
    rows, present, sensor = {}, [], []
    for eb in data.eval_iterator(split=split, max_examples=limit, max_per_task=0):
      out = jax.tree.map(np.asarray, run(params, eb.batch))
      for i, record in enumerate(eb.records):
        if record is None or record.task != "image_caption":
          continue
        present.append(np.asarray(caption_counts(record.turns[1], classes)) > 0)
        sensor.append(record.modality)
        for name, (mean, peak) in out.items():
          rows.setdefault(f"{name}, mean", []).append(mean[i])
          rows.setdefault(f"{name}, max", []).append(peak[i])
    return ({k: np.asarray(v) for k, v in rows.items()}, np.asarray(present, np.float32),
            np.asarray(sensor))

  (fit, fit_y, _), (test, test_y, test_sensor) = collect("train", 9000), collect(
      config.data.eval_split, 1200)
  majority = np.maximum(test_y.mean(0), 1 - test_y.mean(0))
  print(f"object presence in {len(fit_y)} train / {len(test_y)} held-out caption images, one "
        f"ridge per class, held-out accuracy [majority answer]:")
  print("  " + ", ".join(f"{c} [{m:.2f}]" for c, m in zip(classes, majority)) +
        f"; mean [{majority.mean():.3f}]")
  stages = len(config.model.vision.convnext.dims)
  order = [f"convnext stage {i}" for i in range(stages)] + ["encoder tokens", "LLM input"]
  for name in (f"{n}, {pool}" for n in order for pool in ("mean", "max")):
    scores = linear_readout.ridge_fit_predict(fit[name], fit_y, test[name])
    right = (scores > 0.5) == (test_y > 0.5)
    per_class = " ".join(f"{r:.2f}" for r in right.mean(0))
    by_sensor = ", ".join(f"{s} {right[test_sensor == s].mean():.3f}" for s in _SENSORS)
    print(f"  {name} ({fit[name].shape[1]}): {right.mean():.3f}  by class {per_class}  "
          f"({by_sensor})")


if __name__ == "__main__":
  main()
