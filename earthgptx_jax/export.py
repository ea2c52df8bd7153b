"""Export a trained run to PyTorch (and back), verified by parity before anything is kept.

Export: the run's params (LoRA adapters merged, `trainer.model_params`) -> the folder that
`torch_model.EarthGPTXTorch.from_pretrained` loads (layout in torch_model.py): the LLM in HF
LlamaForCausalLM layout (llm/), DINOv2 and the prompt SAE in HF Dinov2 layout, the ConvNeXt
trunk in timm layout (open_clip's `trunk.` keys without the prefix), the SAM parts in HF Sam
layout, the project's own modules in earthgptx.safetensors, the config and the tokenizer. Each
part goes through its converter in `convert/` (one reversible key table each; the own modules'
is convert/own.py). The folder is written under a temporary name; the same random batch
(batch.py's contract) then runs through JAX and PyTorch in float32, and only if logits and mask
logits agree to `PARITY_RTOL` (max |a - b| / max |b|) is it renamed into place.

Import: such a folder -> Flax params (bit-identical to the exported ones) -> an Orbax checkpoint
in a new workdir (config.json, tokenizer/, checkpoints/STEP) that `predictor.Predictor.from_workdir`
and this exporter read like any trained run.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch
from flax import linen as nn

from earthgptx_jax import batch as batch_lib
from earthgptx_jax import checkpointing, config_io, geometry, torch_model, trainer
from earthgptx_jax.convert import keymap
from earthgptx_jax.convert import llama as llama_convert
from earthgptx_jax.convert import own as own_convert
from earthgptx_jax.convert import sam as sam_convert
from earthgptx_jax.convert import vision as vision_convert
from earthgptx_jax.models import earthgptx, prompts

PARITY_RTOL = 1e-5
TOKENIZER_DIR = "tokenizer"


class ExportError(RuntimeError):
  """A one-line reason the export / import cannot proceed (the CLI prints it, exits 1)."""


# ----------------------------------------------------------------------------------------------
# Params <-> folder.


def _numpy_tree(tree) -> dict:
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), nn.meta.unbox(dict(tree)))


def write_folder(config: ml_collections.ConfigDict, params: Mapping, folder: str | os.PathLike,
                 tokenizer_dir: str | os.PathLike | None) -> None:
  """EarthGPTX params (LoRA already merged) -> an EarthGPTXTorch folder (must not exist)."""
  m = config.model
  params = _numpy_tree(params)
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True)
  llama_convert.save_hf_llama(params["llm"], m.llm, folder / torch_model.LLM_DIR)
  vision_convert.save_dinov2(params["vision"]["dino"], m.vision.dino, folder / torch_model.DINO_DIR)
  vision_convert.save_dinov2(params["prompt_encoder"]["sae"], m.prompt.sae,
                             folder / torch_model.SAE_DIR)
  convnext_dir = folder / torch_model.CONVNEXT_DIR
  vision_convert.save_convnext(params["vision"]["convnext"], m.vision.convnext,
                               convnext_dir / "model.safetensors", layout="timm")
  (convnext_dir / "config.json").write_text(json.dumps(
      {"architecture": "timm.models.convnext.ConvNeXt",
       "kwargs": torch_model.convnext_kwargs(m.vision.convnext)}, indent=2))
  sam_dir = folder / torch_model.SAM_DIR
  keymap.save_safetensors(sam_convert.flax_to_torch(params["pixel"], m.pixel), sam_dir)
  sam_convert.write_hf_sam_config(m.pixel, sam_dir)
  own = keymap.to_torch(params, own_convert.own_rules(m))
  own[torch_model.FOURIER_KEY] = np.asarray(prompts.fourier_gaussian(m.prompt))
  keymap.save_safetensors(own, folder)
  (folder / keymap.SAFETENSORS_SINGLE).rename(folder / torch_model.NEW_MODULES_FILE)
  (folder / "config.json").write_text(config.to_json_best_effort(indent=2))
  if tokenizer_dir is not None:
    shutil.copytree(tokenizer_dir, folder / TOKENIZER_DIR)


def expected_params(config: ml_collections.ConfigDict) -> dict:
  """ShapeDtypeStructs of the EarthGPTX params for `config` (traced, never allocated)."""
  example = jax.tree.map(jnp.asarray, batch_lib.example_batch(config, 1))
  shapes = jax.eval_shape(lambda: earthgptx.EarthGPTX(config.model).init(jax.random.key(0),
                                                                        example))
  return nn.meta.unbox(shapes)["params"]


def read_folder(folder: str | os.PathLike) -> tuple[ml_collections.ConfigDict, dict]:
  """An EarthGPTXTorch folder -> (config, numpy EarthGPTX params), bit-identical to export."""
  folder = pathlib.Path(folder)
  if not (folder / "config.json").is_file():
    raise ExportError(f"--import_folder: {folder} has no config.json (not an export folder)")
  try:
    config = config_io.load_config(folder / "config.json")
  except (OSError, json.JSONDecodeError) as e:
    raise ExportError(f"{folder / 'config.json'}: cannot read the config ({e})") from None
  m = config.model
  try:
    _, llm = llama_convert.load_hf_llama(folder / torch_model.LLM_DIR, m.llm)
    _, dino = vision_convert.load_dinov2(folder / torch_model.DINO_DIR, m.vision.dino)
    _, sae = vision_convert.load_dinov2(folder / torch_model.SAE_DIR, m.prompt.sae)
    _, convnext = vision_convert.load_convnext(
        folder / torch_model.CONVNEXT_DIR / "model.safetensors", m.vision.convnext)
    sam = sam_convert.load_hf_sam(folder / torch_model.SAM_DIR, m.pixel)
    own_state = keymap.load_safetensors(folder / torch_model.NEW_MODULES_FILE)
  except (OSError, ValueError) as e:
    raise ExportError(f"--import_folder: {folder}: {e}") from None
  gaussian = own_state.pop(torch_model.FOURIER_KEY, None)
  if gaussian is None or not np.array_equal(gaussian, np.asarray(prompts.fourier_gaussian(m.prompt))):
    raise ExportError(f"{folder / torch_model.NEW_MODULES_FILE}: {torch_model.FOURIER_KEY} is "
                      f"missing or differs from model.prompt.fourier_seed's Gaussian")
  own = keymap.to_flax(own_state, own_convert.own_rules(m))
  params = {"llm": llm, "vision": {"convnext": convnext, "dino": dino},
            "prompt_encoder": {**own["prompt_encoder"], "sae": sae},
            "integration": own["integration"], "pixel": {**own["pixel"], **sam}}
  for name in ("region_encoder", "box_head"):
    if name in own:
      params[name] = own[name]
  want = keymap.flatten(expected_params(config))
  got = keymap.flatten(params)
  if set(want) != set(got):
    raise ExportError(f"{folder}: params do not match the config's model: missing "
                      f"{sorted(set(want) - set(got))[:5]}, unexpected {sorted(set(got) - set(want))[:5]}")
  for path, spec in want.items():
    if tuple(got[path].shape) != tuple(spec.shape):
      raise ExportError(f"{folder}: {path} has shape {got[path].shape}, the model wants "
                        f"{tuple(spec.shape)}")
  return config, params


# ----------------------------------------------------------------------------------------------
# Workdirs (Orbax checkpoints).


def load_workdir(workdir: str | os.PathLike, step: int | None = None
                 ) -> tuple[ml_collections.ConfigDict, dict, int]:
  """A training workdir -> (config, params with LoRA merged, step), restored read-only on one
  device."""
  try:
    config, step, params = checkpointing.load_workdir_params(workdir, step)
  except checkpointing.WorkdirReadError as e:
    raise ExportError(str(e)) from None
  return config, _numpy_tree(params), int(step)


def save_workdir(config: ml_collections.ConfigDict, trainable: Mapping, workdir: str | os.PathLike,
                 *, step: int = 0, tokenizer_dir: str | os.PathLike | None = None) -> None:
  """{"params": ..., "lora": ...} -> an Orbax train-state checkpoint in a new workdir (fresh
  optimizer state), with config.json and tokenizer/ as training.py writes them."""
  workdir = pathlib.Path(workdir)
  if (workdir / "checkpoints").exists():
    raise ExportError(f"--workdir: {workdir} already holds checkpoints; choose a new folder")
  model = trainer.build_model(config)
  optimizer = trainer.make_optimizer(config, model)
  trainable = jax.tree.map(jnp.asarray, dict(trainable))
  state = trainer.TrainState(step=jnp.asarray(step, jnp.int32), trainable=trainable,
                             opt_state=optimizer.init(trainable),
                             skipped_steps=jnp.zeros((), jnp.int32))
  workdir.mkdir(parents=True, exist_ok=True)
  ckpt = checkpointing.Checkpointer(workdir / "checkpoints", config.checkpoint)
  try:
    ckpt.save(step, state, config=config, force=True)
    ckpt.wait()
  finally:
    ckpt.close()
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  if tokenizer_dir is not None:
    shutil.copytree(tokenizer_dir, workdir / TOKENIZER_DIR, dirs_exist_ok=True)


def import_folder(folder: str | os.PathLike, workdir: str | os.PathLike, step: int = 0) -> None:
  """An EarthGPTXTorch folder -> a workdir whose checkpoint holds the same params bit-exactly."""
  config, params = read_folder(folder)
  config.train.lora.rank = 0  # the folder holds merged weights
  tokenizer = pathlib.Path(folder) / TOKENIZER_DIR
  save_workdir(config, {"params": params, "lora": {}}, workdir, step=step,
               tokenizer_dir=tokenizer if tokenizer.is_dir() else None)


# ----------------------------------------------------------------------------------------------
# Parity.


def verification_batch(config: ml_collections.ConfigDict, batch_size: int = 2, seed: int = 0
                       ) -> dict[str, np.ndarray]:
  """A random batch honouring batch.py: images, one padding tile in example 0, 1..P prompts of
  each type with their <vp_patch> tokens, text, a [SEG] (and a [BOX] with the box head on) in
  the answer, padding at the end."""
  m = config.model
  ids = m.token_ids
  rng = np.random.default_rng(seed)
  b = batch_lib.example_batch(config, batch_size)
  views, s = b["pixel_values"].shape[1], m.vision.image_size
  per_view = m.vision.token_grid ** 2
  k, msize = m.prompt.tokens_per_prompt, m.prompt.map_size
  specials = {ids[n] for n in ("image_patch", "vp_patch", "seg", "bos", "eos", "pad")}
  box_head = bool(m.box.head)
  if box_head:
    specials.add(ids.box)
  text_ids = np.array([t for t in range(m.llm.vocab_size) if t not in specials])
  b["pixel_values"][:] = rng.uniform(0, 1, b["pixel_values"].shape)
  b["view_valid"][:] = True
  # A 100 x 160 image's real views: tiles map to their part of the global view.
  b["view_affine"][:] = geometry.view_affines(100, 160, s, views - 1)[0]
  for i in range(batch_size):
    if i == 0 and views > 1:
      b["view_valid"][i, -1] = False
    tokens = [ids.bos] + [ids.image_patch] * (views * per_view)
    vp_index = [-1] * len(tokens)
    for p in range(1 + i % m.prompt.max_prompts):
      x1, y1 = rng.integers(0, msize // 2, 2)
      x2, y2 = x1 + rng.integers(1, msize // 2), y1 + rng.integers(1, msize // 2)
      b["prompt_maps"][i, p, y1:y2, x1:x2] = 1.0
      b["prompt_geometry"][i, p] = np.array([x1, y1, x2, y2]) / msize
      b["prompt_type"][i, p] = p % 3
      b["prompt_valid"][i, p] = True
      vp_index += [p * k + j for j in range(k)]
      tokens += [ids.vp_patch] * k
    text = list(rng.choice(text_ids, 10)) + [ids.box] * box_head + [ids.seg, ids.eos]
    tokens += text
    vp_index += [-1] * len(text)
    n = len(tokens)
    if n > config.data.max_length:
      raise ExportError(f"data.max_length={config.data.max_length} is shorter than the "
                        f"verification sequence ({n} tokens)")
    b["input_ids"][i, :n] = tokens
    b["attention_mask"][i, :n] = True
    if not b["view_valid"][i, -1]:
      b["attention_mask"][i, 1 + (views - 1) * per_view:1 + views * per_view] = False
    b["targets"][i, :n - 1] = tokens[1:]
    b["loss_mask"][i, n - len(text) - 1:n - 1] = True
    b["vp_token_index"][i, :n] = vp_index
    b["seg_valid"][i, 0] = True
    # Example 0 regresses at its target's cell (training), example 1 at its argmax cell.
    b["box_valid"][i, 0] = box_head and i == 0
    corner = rng.uniform(0.1, 0.6, 2)
    b["box_targets"][i, 0] = [*corner, *(corner + 0.3)]
  b["image_size"][:] = s
  return b


def float32_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy computing in float32 with the portable XLA attention (the parity reference)."""
  out = ml_collections.ConfigDict(config.to_dict())

  def visit(node):
    for key, value in node.items():
      if isinstance(value, ml_collections.ConfigDict):
        visit(value)
      elif key == "dtype":
        node[key] = "float32"
      elif key == "attention_impl":
        node[key] = "xla"
  visit(out)
  return out


def relative_error(got, want) -> float:
  """max |got - want| / max |want| (the parity figure)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if got.shape != want.shape:
    raise ExportError(f"parity: shapes differ, JAX {want.shape} vs PyTorch {got.shape}")
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def jax_outputs(config: ml_collections.ConfigDict, params: Mapping, batch: Mapping) -> dict:
  """EarthGPTX in float32 on `batch`: {logits, mask_logits, iou, boxes} as numpy (the
  reference)."""
  out = jax.jit(earthgptx.EarthGPTX(float32_config(config).model).apply)(
      {"params": jax.tree.map(jnp.asarray, dict(params))}, jax.tree.map(jnp.asarray, dict(batch)))
  return {"logits": np.asarray(out.logits), "mask_logits": np.asarray(out.mask_logits),
          "iou": np.asarray(out.iou_scores), "boxes": np.asarray(out.boxes)}


def torch_outputs(folder: str | os.PathLike, batch: Mapping) -> dict:
  """EarthGPTXTorch.from_pretrained(folder) on `batch`: {logits, mask_logits, iou, boxes} as
  numpy."""
  model = torch_model.EarthGPTXTorch.from_pretrained(folder)
  with torch.no_grad():
    logits, masks, iou, boxes = model({k: torch.from_numpy(np.asarray(v))
                                       for k, v in batch.items()})
  return {"logits": logits.numpy(), "mask_logits": masks.numpy(), "iou": iou.numpy(),
          "boxes": boxes.numpy()}


def parity(reference: Mapping, got: Mapping) -> dict[str, float]:
  return {k: relative_error(got[k], reference[k])
          for k in ("logits", "mask_logits", "iou", "boxes")}


def verify(config: ml_collections.ConfigDict, params: Mapping, folder: str | os.PathLike, *,
           batch_size: int = 2, seed: int = 0) -> dict[str, float]:
  """The same random batch through JAX (float32) and EarthGPTXTorch.from_pretrained(folder);
  returns the relative errors of logits, mask logits, IoU and boxes (0 with the head off)."""
  batch = verification_batch(float32_config(config), batch_size, seed)
  return parity(jax_outputs(config, params, batch), torch_outputs(folder, batch))


def export(config: ml_collections.ConfigDict, params: Mapping, out: str | os.PathLike, *,
           tokenizer_dir: str | os.PathLike | None = None, rtol: float = PARITY_RTOL,
           log=print) -> dict[str, float]:
  """Writes the folder under a temporary name, verifies parity, then renames it to `out`."""
  out = pathlib.Path(out)
  if out.exists():
    raise ExportError(f"--out: {out} already exists; choose a new folder")
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
  except OSError as e:
    raise ExportError(f"--out: cannot write in {out.parent}: {e.strerror or e}") from None
  try:
    staging = tmp / "export"
    write_folder(config, params, staging, tokenizer_dir)
    errors = verify(config, params, staging)
    log("parity JAX vs PyTorch (float32, max|a-b|/max|b|): " +
        ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    bad = {k: v for k, v in errors.items() if k != "iou" and not v <= rtol}
    if bad:
      raise ExportError(f"parity check failed (> {rtol:g}): {bad}; nothing written to {out}")
    staging.rename(out)
  except OSError as e:
    raise ExportError(f"--out: writing {out} failed: {e}") from None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return errors
