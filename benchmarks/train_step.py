"""Full-model train step: our jitted step vs an eager PyTorch step of the same model, CPU.

    python -m benchmarks.train_step                    # tiny preset, batch 8
    python -m benchmarks.train_step --batch_size=2 --repeats=3

Both sides start from the same weights (ours exported with `earthgptx_jax.export_torch` and
loaded as `EarthGPTXTorch`), take the same batch from the data pipeline (synthetic_rs, the
preset's loader) and do one full optimizer step: forward, the project's loss (answer-token CE
+ mask BCE + Dice + box L1 + gIoU + cell CE, config weights), backward, global-norm clipping,
AdamW. The first losses must agree (printed). Reported: the compile time of our step, the median step time of each
(after warm-up; both sides alternate so shared-CPU load hits them alike; `block_until_ready`
on ours), the ratio ours / torch, our FLOP/s (XLA's count of the compiled step) as a fraction
of the float32 GEMM rate measured in the same run, and the process's peak RSS after each side.
"""

from __future__ import annotations

from earthgptx_jax import host_memory

if __name__ == "__main__":  # as the train command does, before the imports below
  host_memory.reexec_with_huge_page_malloc()

import argparse
import json
import pathlib
import resource
import tempfile
import time

import jax
import numpy as np
import torch
import torchvision
from flax import linen as nn

from earthgptx_jax import perf, sharding, trainer
from earthgptx_jax import torch_model as torch_model_lib
from earthgptx_jax import torch_modules

DICE_SCALE, DICE_EPS = 1000.0, 1e-6  # as earthgptx_jax/losses.py (LISA)


def peak_rss_gb() -> float:
  """Peak resident memory of this process so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def prepared_data(preset: str, batch_size: int, data_dir: str, num_records: int = 64):
  """(Data with the config filled from the tokenizer, one numpy batch) for `preset`.

  synthetic_rs with `num_records` train records per sensor in its own `data_dir` (a benchmark
  needs a few batches, not the preset's full set).
  """
  from configs import fusion
  from data_pipelines import pipeline, tokenizer_training
  from earthgptx_jax import tokenizer as tokenizer_lib
  config = fusion.get_config(preset)
  config.train.batch_size = batch_size
  config.data.data_dir = data_dir
  config.data.synthetic.num_train = num_records
  config.data.synthetic.num_eval = 8
  tokenizer = tokenizer_training.ensure_tokenizer(config)
  data = pipeline.prepare(tokenizer_lib.complete_config(config, tokenizer), tokenizer)
  iterator = data.train_iterator()
  batch = next(iterator)
  iterator.close()
  return data, batch


def torch_loss(config, batch, logits, mask_logits, boxes, cell_logits):
  """The project's training loss (earthgptx_jax/losses.py) in torch, for the reference step."""
  loss_mask = batch["loss_mask"].bool()
  nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].long().flatten(),
                                          reduction="none").view(loss_mask.shape)
  if config.train.get("answer_ce", "token") == "example":  # losses.answer_cross_entropy
    count = loss_mask.sum(-1)
    per_example = (nll * loss_mask).sum(-1) / count.clamp(min=1)
    ce = per_example.sum() / (count > 0).sum().clamp(min=1)
  else:
    ce = (nll * loss_mask).sum() / loss_mask.sum().clamp(min=1)
  valid = batch["seg_valid"].bool()
  keep = valid[:, :, None, None]
  x = torch.where(keep, mask_logits, torch.zeros_like(mask_logits))
  y = torch.where(keep, batch["seg_masks"].float(), torch.zeros_like(mask_logits))
  bce = torch.nn.functional.binary_cross_entropy_with_logits(x, y, reduction="none").mean((-2, -1))
  p = torch.sigmoid(x)
  num = 2.0 * (p / DICE_SCALE * y).sum((-2, -1))
  den = (p / DICE_SCALE).sum((-2, -1)) + (y / DICE_SCALE).sum((-2, -1))
  dice = 1.0 - (num + DICE_EPS) / (den + DICE_EPS)
  count = valid.sum().clamp(min=1)
  bce, dice = (bce * valid).sum() / count, (dice * valid).sum() / count
  box_valid = batch["box_valid"].bool()
  pred, target = boxes[box_valid], batch["box_targets"][box_valid].float()
  num_boxes = box_valid.sum().clamp(min=1)
  l1 = (pred - target).abs().sum() / num_boxes
  giou = torchvision.ops.generalized_box_iou_loss(pred, target, reduction="sum") / num_boxes
  cell = torch.zeros(())
  if cell_logits is not None:
    cells = torch_modules.centre_cells(target, *cell_logits.shape[-2:])
    cell = torch.nn.functional.cross_entropy(cell_logits[box_valid].flatten(1), cells,
                                             reduction="sum") / num_boxes
  w = config.loss
  return (w.ce * ce + w.mask_bce * bce + w.mask_dice * dice + w.box_l1 * l1
          + w.box_giou * giou + w.box_cell * cell)


def run(data, batch: dict[str, np.ndarray], repeats: int = 5, warmup: int = 2,
        with_torch: bool = True) -> dict:
  """Times both train steps on `batch`; returns the figures (seconds, FLOPs, ratios, RSS)."""
  config = data.config
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  model = trainer.build_model(config)
  optimizer = trainer.make_optimizer(config, model)
  state, state_sh = trainer.create_state(model, optimizer, config, mesh, jax.random.key(0))
  params0 = jax.device_get(nn.meta.unbox(state.params))  # before the donated steps
  step = trainer.make_train_step(model, optimizer, config, mesh, state_sh, len(data.task_names))
  jbatch = trainer.global_batch(batch, config, mesh)
  start = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    compiled = step.jitted.lower(state, jbatch).compile()
  compile_s = time.perf_counter() - start
  flops = perf.compiled_flops(compiled)
  holder = {"state": state}

  def jax_step():
    holder["state"], metrics = compiled(holder["state"], jbatch)
    return jax.block_until_ready(metrics)

  first_loss = float(jax_step()["loss"])
  for _ in range(warmup - 1):
    jax_step()
  result = dict(batch_size=int(config.train.batch_size), seq_len=int(config.data.max_length),
                params=int(sum(x.size for x in jax.tree.leaves(params0))),
                compile_s=compile_s, flops_per_step=flops, jax_first_loss=first_loss,
                rss_after_jax_gb=peak_rss_gb())
  fns = [jax_step]
  if with_torch:
    from earthgptx_jax import export
    with tempfile.TemporaryDirectory() as tmp:
      folder = pathlib.Path(tmp) / "export"
      export.write_folder(config, params0, folder, tokenizer_dir=None)
      torch_model = torch_model_lib.EarthGPTXTorch.from_pretrained(folder).train()
    tbatch = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    tc = config.train
    torch_opt = torch.optim.AdamW(torch_model.parameters(), lr=tc.learning_rate,
                                  weight_decay=tc.weight_decay)

    def torch_step():
      torch_opt.zero_grad(set_to_none=True)
      logits, mask_logits, _, boxes, cell_logits = torch_model(tbatch, return_box_cell_logits=True)
      loss = torch_loss(config, tbatch, logits, mask_logits, boxes, cell_logits)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(torch_model.parameters(), tc.grad_clip_norm)
      torch_opt.step()
      return float(loss.detach())

    result["torch_first_loss"] = torch_step()
    for _ in range(warmup - 1):
      torch_step()
    fns.append(torch_step)
    result["torch_threads"] = torch.get_num_threads()
  times = perf.interleaved_median(fns, repeats)
  result["jax_step_s"] = times[0]
  if with_torch:
    result["torch_step_s"] = times[1]
    result["ratio_vs_torch"] = times[0] / times[1]
    result["rss_after_torch_gb"] = peak_rss_gb()
  result["gemm_peak_flop_s"] = perf.measured_matmul_peak()
  if flops:
    result["jax_flop_s"] = flops / times[0]
    result["fraction_of_gemm_peak"] = result["jax_flop_s"] / result["gemm_peak_flop_s"]
  result["examples_per_s"] = result["batch_size"] / times[0]
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--data_dir", default="/tmp/earthgptx_bench_data")
  parser.add_argument("--out", default="benchmarks/results/train_step.json")
  args = parser.parse_args()
  data, batch = prepared_data(args.preset, args.batch_size, args.data_dir)
  r = run(data, batch, args.repeats)
  print(json.dumps(r, indent=2))
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
  main()
