"""Export to PyTorch: EarthGPTXTorch parity with EarthGPTX, reverse import, LoRA merge, bad input.

One tiny random model (params of the real module's shapes, filled from numpy so that no init
is compiled) is exported once; the JAX reference outputs are computed once and reused.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from earthgptx_jax import export as et
from earthgptx_jax import lora, torch_model
from earthgptx_jax.convert import keymap
from earthgptx_jax.convert import own as own_convert
from model_fixtures import tiny_config

RTOL = 1e-5
REPO = pathlib.Path(__file__).resolve().parents[1]


def _random_params(config, seed: int = 0) -> dict:
  """Params of every EarthGPTX leaf, random (norm scales and layer scales around 1)."""
  rng = np.random.default_rng(seed)

  def fill(path, spec):
    name = jax.tree_util.keystr(path)
    if any(n in name for n in ("'scale'", "'weight'", "layer_scale")):
      return (1 + 0.1 * rng.standard_normal(spec.shape)).astype(np.float32)
    return (0.1 * rng.standard_normal(spec.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, et.expected_params(config))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(config, params, folder, verification figures, JAX reference outputs, batch)."""
  config = tiny_config()
  params = _random_params(config)
  folder = tmp_path_factory.mktemp("export") / "model"
  batch = et.verification_batch(config, 2, seed=0)
  reference = et.jax_outputs(config, params, batch)
  figures = et.parity(reference, _export_without_verify(config, params, folder, batch))
  return config, params, folder, figures, reference, batch


def _export_without_verify(config, params, folder, batch):
  et.write_folder(config, params, folder, tokenizer_dir=None)
  return et.torch_outputs(folder, batch)


def test_torch_model_matches_jax(exported):
  _, _, _, figures, reference, batch = exported
  print("parity", figures)
  assert figures["logits"] <= RTOL and figures["mask_logits"] <= RTOL and figures["iou"] <= RTOL
  assert figures["boxes"] <= RTOL
  # The batch exercises every path: a padding tile, prompts of each type, a [SEG] and a [BOX]
  # per example.
  assert not batch["view_valid"].all() and set(batch["prompt_type"][batch["prompt_valid"]]) == {0, 1}
  ids = tiny_config().model.token_ids
  assert (batch["targets"] == ids.seg).sum(axis=1).tolist() == [1, 1]
  assert (batch["targets"] == ids.box).sum(axis=1).tolist() == [1, 1]
  assert (reference["boxes"][:, 0] > 0).any() and not reference["boxes"][:, 1].any()
  assert np.abs(reference["mask_logits"]).max() > 0 and np.isfinite(reference["logits"]).all()


def test_folder_written_before_a_config_field_existed_still_loads(exported, tmp_path):
  """An export (or workdir) saved before the base config gained a field (config_io.ADDED_FIELDS)
  loads as the network it was: here `model.vision.convnext.stem_type`, absent before timm's
  overlapping stems."""
  _, _, folder, _, reference, batch = exported
  old = tmp_path / "old"
  shutil.copytree(folder, old)
  saved = json.loads((old / "config.json").read_text())
  del saved["model"]["vision"]["convnext"]["stem_type"]
  (old / "config.json").write_text(json.dumps(saved))
  assert et.parity(reference, et.torch_outputs(old, batch))["logits"] <= RTOL


def test_parity_detects_a_changed_weight(exported, tmp_path):
  """A parity check that could not fail would be worthless: perturb one ported weight."""
  config, params, folder, _, reference, batch = exported
  import shutil
  tampered = tmp_path / "tampered"
  shutil.copytree(folder, tampered)
  state = keymap.load_safetensors(tampered / torch_model.NEW_MODULES_FILE)
  state["integration.cross_attn.value.weight"] = state["integration.cross_attn.value.weight"] * 1.01
  keymap.save_safetensors(state, tampered)
  (tampered / keymap.SAFETENSORS_SINGLE).replace(tampered / torch_model.NEW_MODULES_FILE)
  figures = et.parity(reference, et.torch_outputs(tampered, batch))
  assert figures["logits"] > 10 * RTOL


def test_folder_loads_in_the_standard_libraries(exported):
  import timm.models.convnext
  import transformers
  from safetensors.torch import load_file
  config, _, folder, _, _, _ = exported
  llm = transformers.LlamaForCausalLM.from_pretrained(folder / "llm")
  assert llm.config.hidden_size == config.model.llm.hidden_size
  kwargs = json.loads((folder / "convnext" / "config.json").read_text())["kwargs"]
  trunk = timm.models.convnext.ConvNeXt(**kwargs)
  trunk.load_state_dict(load_file(str(folder / "convnext" / "model.safetensors")))  # strict
  sae = transformers.Dinov2Model.from_pretrained(folder / "prompt_sae")
  assert sae.config.num_channels == 1
  sam = transformers.SamModel.from_pretrained(folder / "sam", output_loading_info=True)[1]
  assert not sam["missing_keys"] and not sam["unexpected_keys"]


@pytest.fixture(scope="module")
def imported_run(exported, tmp_path_factory):
  """The exported folder imported into a new workdir (an Orbax checkpoint at step 7)."""
  _, _, folder, _, _, _ = exported
  run = tmp_path_factory.mktemp("imported") / "run"
  et.import_folder(folder, run, step=7)
  return run


def test_reverse_import_is_bit_exact(exported, imported_run):
  config, params, folder, _, _, _ = exported
  _, imported = et.read_folder(folder)
  want, got = keymap.flatten(params), keymap.flatten(imported)
  assert want.keys() == got.keys()
  for path in want:
    assert got[path].dtype == want[path].dtype and np.array_equal(got[path], want[path]), path
  # ... and on through the Orbax checkpoint of the new workdir.
  cfg, restored, step = et.load_workdir(imported_run)
  assert step == 7 and cfg.model.llm.hidden_size == config.model.llm.hidden_size
  restored = keymap.flatten(restored)
  assert restored.keys() == want.keys() and all(np.array_equal(restored[p], want[p]) for p in want)


def test_lora_is_merged_on_export(tmp_path):
  config = tiny_config()
  config.train.lora.rank = 2
  params = _random_params(config, seed=1)
  adapters = lora.init(jax.random.key(0), params, config.train.lora)
  adapters = jax.tree.map(lambda x: np.full(x.shape, 0.05, np.float32), adapters)  # B != 0
  et.save_workdir(config, {"params": params, "lora": adapters}, tmp_path / "run", step=3)
  _, merged, step = et.load_workdir(tmp_path / "run")
  path = "llm/layers_0/self_attn/q_proj/kernel"
  want = np.asarray(lora.merge(params, adapters, config.train.lora)["llm"]["layers_0"]
                    ["self_attn"]["q_proj"]["kernel"])
  assert step == 3 and not np.allclose(want, keymap.flatten(params)[path])
  np.testing.assert_array_equal(keymap.flatten(merged)[path], want)
  et.write_folder(config, merged, tmp_path / "out", tokenizer_dir=None)
  q = keymap.load_safetensors(tmp_path / "out" / "llm")["model.layers.0.self_attn.q_proj.weight"]
  np.testing.assert_array_equal(q, want.reshape(want.shape[0], -1).T)


def test_export_refuses_existing_and_unwritable_outputs(exported, tmp_path):
  config, params, folder, _, _, _ = exported
  with pytest.raises(et.ExportError, match="already exists"):
    et.export(config, params, folder)
  with pytest.raises(et.ExportError, match="--out: cannot write"):
    et.export(config, params, "/proc/earthgptx_export/model")


def test_failed_parity_leaves_nothing_behind(exported, tmp_path, monkeypatch):
  config, params, _, _, _, _ = exported
  monkeypatch.setattr(et, "verify", lambda *a, **k: {"logits": 1.0, "mask_logits": 0.0,
                                                     "iou": 0.0})
  with pytest.raises(et.ExportError, match="parity check failed"):
    et.export(config, params, tmp_path / "model")
  assert list(tmp_path.iterdir()) == []  # neither the output nor the temporary folder


def test_missing_and_corrupt_checkpoints(imported_run, tmp_path):
  import shutil
  with pytest.raises(et.ExportError, match="no config.json"):
    et.load_workdir(tmp_path / "nothing")
  with pytest.raises(et.ExportError, match="no checkpoint 5"):
    et.load_workdir(imported_run, step=5)
  run = tmp_path / "run"
  shutil.copytree(imported_run, run)
  for f in (run / "checkpoints" / "7" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  with pytest.raises(et.ExportError, match="could be restored"):
    et.load_workdir(run)


def test_import_rejects_a_folder_with_a_wrong_tensor(exported, tmp_path):
  import shutil
  _, _, folder, _, _, _ = exported
  broken = tmp_path / "broken"
  shutil.copytree(folder, broken)
  state = keymap.load_safetensors(broken / "prompt_sae")
  state["embeddings.cls_token"] = state["embeddings.cls_token"][..., :-1]
  keymap.save_safetensors(state, broken / "prompt_sae")
  with pytest.raises(et.ExportError, match="cls_token"):
    et.read_folder(broken)


def test_cli_one_line_error_without_jax_in_torch_model(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "earthgptx_jax.export_torch",
                         f"--workdir={tmp_path / 'missing'}", f"--out={tmp_path / 'out'}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --workdir:")
  assert not (tmp_path / "out").exists()
  code = ("import sys, earthgptx_jax.torch_model; "
          "sys.exit(any(m == 'jax' or m.startswith(('jax.', 'flax')) for m in sys.modules))")
  assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=300).returncode == 0


@pytest.mark.slow
def test_paper_preset_is_representable():
  """The paper preset's folder layout: every own-module rule matches a param of the model."""
  from configs import fusion
  config = fusion.get_config("paper")
  config.model.token_ids.update(dict(bos=1, eos=2, pad=0, image_patch=31997, vp_patch=31998,
                                     seg=31999))
  shapes = keymap.flatten(et.expected_params(config))
  rules = own_convert.own_rules(config.model)
  assert all(r.flax_path in shapes for r in rules)
  kwargs = torch_model.convnext_kwargs(config.model.vision.convnext)
  assert kwargs["dims"] == (192, 384, 768, 1536)


@pytest.mark.slow
def test_variant_paths_match_jax(tmp_path):
  """The other branches: SAM decoder on the mixed dense map, DINOv2 with registers (HF
  Dinov2WithRegistersModel) read at its penultimate layer, a scanned and tied LLM, region
  features from two later ConvNeXt stages only, with the box features, timm's overlapping
  ConvNeXt stem."""
  config = tiny_config()
  config.model.vision.convnext.stem_type = "overlap_act"
  config.model.prompt.region.update(sources=("convnext_1", "convnext_3"), bins=3,
                                    box_features=True)
  config.model.pixel.image_encoder = "mixed"
  config.model.vision.dense_source = "mixed"
  config.model.vision.dino_layer = -2
  config.model.vision.dino.num_register_tokens = 2
  config.model.vision.dino.pos_interp_antialias = True
  config.model.llm.scan_layers = True
  config.model.llm.tie_word_embeddings = True
  params = _random_params(config, seed=2)
  figures = et.export(config, params, tmp_path / "model")
  assert figures["logits"] <= RTOL and figures["mask_logits"] <= RTOL
  _, imported = et.read_folder(tmp_path / "model")
  want, got = keymap.flatten(params), keymap.flatten(imported)
  assert want.keys() == got.keys() and all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_cli_exports_a_trained_workdir(tmp_path, shared_data):
  """train.py (2 steps, tiny) -> export CLI -> EarthGPTXTorch loads; import CLI round trips."""
  del shared_data
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device per process, as a user runs it
  run = tmp_path / "run"
  subprocess.run([sys.executable, "-m", "earthgptx_jax.train", "--config=configs/fusion.py:tiny",
                  f"--workdir={run}", "--config.train.steps=2", "--config.train.eval_examples=4",
                  f"--config.data.data_dir={tmp_path / 'data'}"], cwd=REPO, env=env, check=True,
                 timeout=1800)
  proc = subprocess.run([sys.executable, "-m", "earthgptx_jax.export_torch", f"--workdir={run}",
                         f"--out={tmp_path / 'out'}"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-2000:]
  figures = [line for line in proc.stdout.splitlines() if line.startswith("parity")]
  assert figures, proc.stdout
  assert (tmp_path / "out" / "tokenizer").is_dir()
  proc = subprocess.run([sys.executable, "-m", "earthgptx_jax.export_torch",
                         f"--import_folder={tmp_path / 'out'}", f"--workdir={tmp_path / 'back'}"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-2000:]
  _, a, _ = et.load_workdir(run)
  _, b, _ = et.load_workdir(tmp_path / "back")
  a, b = keymap.flatten(a), keymap.flatten(b)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _keys(d: dict, prefix: str = "") -> set[str]:
  """Every key of a nested config dict, sub-configs as 'vision_config.hidden_size'."""
  out = set()
  for k, v in d.items():
    out.add(prefix + k)
    if isinstance(v, dict) and k.endswith("_config"):
      out |= _keys(v, f"{prefix}{k}.")
  return out


def test_exported_config_json_keeps_every_field_of_the_original(tmp_path):
  """The SAM, DINOv2 and LLaMA config.json files of an export hold every key of the HF
  config's to_dict() (SAM's lacked `architectures` and all default-valued fields) and every
  field of the pretrained folder the run started from (e.g. a DINOv2 `intermediate_size`)."""
  import torch
  import transformers
  from earthgptx_jax import pretrained
  from earthgptx_jax.convert import sam as sam_convert
  config = tiny_config()
  m = config.model
  # Pretrained folders as a run names them: a SamModel of the preset's sizes, and DINOv2 /
  # LLaMA config.json files that carry fields beyond what transformers writes today.
  sam_dir, dino_dir, llm_dir = tmp_path / "sam_in", tmp_path / "dino_in", tmp_path / "llm_in"
  torch.manual_seed(0)
  transformers.SamModel(sam_convert.hf_sam_config(m.pixel)).save_pretrained(sam_dir)
  dino_original = dict(json.loads(json.dumps(_dino_hf_dict(m.vision.dino))),
                       intermediate_size=int(m.vision.dino.hidden_size * m.vision.dino.mlp_ratio),
                       custom_field="kept")
  dino_dir.mkdir()
  (dino_dir / "config.json").write_text(json.dumps(dino_original))
  llm_dir.mkdir()
  (llm_dir / "config.json").write_text(json.dumps({"model_type": "llama", "pad_token_id": 7,
                                                   "custom_field": "kept"}))
  m.pixel.pretrained_path, m.vision.dino.pretrained_path = str(sam_dir), str(dino_dir)
  m.llm.pretrained_path = str(llm_dir)
  pretrained.resolve_config(config, log=lambda msg: None)

  folder = tmp_path / "export"
  et.write_folder(config, _random_params(config), folder, tokenizer_dir=None)
  sam = json.loads((folder / "sam" / "config.json").read_text())
  assert sam["architectures"] == ["SamModel"]
  want = _keys(sam_convert.hf_sam_config(m.pixel).to_dict())
  want |= _keys(json.loads((sam_dir / "config.json").read_text()))
  assert want <= _keys(sam), sorted(want - _keys(sam))
  dino = json.loads((folder / "dino" / "config.json").read_text())
  assert dino["intermediate_size"] == dino_original["intermediate_size"]
  assert dino["custom_field"] == "kept" and dino["architectures"] == ["Dinov2Model"]
  assert set(transformers.Dinov2Config().to_dict()) <= set(dino)
  llm = json.loads((folder / "llm" / "config.json").read_text())
  assert llm["custom_field"] == "kept" and llm["architectures"] == ["LlamaForCausalLM"]
  assert set(transformers.LlamaConfig().to_dict()) <= set(llm)
  # Ours wins where both have a field: the export describes the exported weights.
  assert dino["hidden_size"] == m.vision.dino.hidden_size
  assert llm["vocab_size"] == m.llm.vocab_size
  # ... and the folders still load in transformers.
  assert transformers.SamConfig.from_pretrained(folder / "sam").vision_config.hidden_size == (
      m.pixel.sam_vit.hidden_size)
  assert transformers.AutoConfig.from_pretrained(folder / "dino").hidden_size == (
      m.vision.dino.hidden_size)


def _dino_hf_dict(dino) -> dict:
  from earthgptx_jax.convert import vision as vision_convert
  return vision_convert.dinov2_hf_config(dino)


def test_sam_export_without_a_pretrained_folder_is_complete(tmp_path):
  import transformers
  from earthgptx_jax.convert import sam as sam_convert
  config = tiny_config()
  pixel = config.model.pixel
  sam_convert.save_hf_sam(_random_params(config)["pixel"], pixel, tmp_path)
  sam = json.loads((tmp_path / "config.json").read_text())
  assert sam["architectures"] == ["SamModel"]
  want = _keys(sam_convert.hf_sam_config(pixel).to_dict())
  assert want <= _keys(sam), sorted(want - _keys(sam))
