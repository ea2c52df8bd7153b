"""The recipe's presets are overrides of one base config: values land where named, shared
references survive, and a mistyped key is an error instead of a new field."""

import pytest

from configs import fusion

LOSS_TERMS = ("ce", "mask_bce", "mask_dice", "box_l1", "box_giou", "box_cell")


@pytest.mark.parametrize("preset", ["paper", "paper13b", "gpu1b", "tiny"])
def test_every_preset_weighs_the_same_loss_terms(preset):
  loss = fusion.get_config(preset).loss
  assert sorted(loss.keys()) == sorted(LOSS_TERMS)
  assert (loss.ce, loss.mask_bce, loss.mask_dice) == (1.0, 2.0, 0.5)  # LISA's weights
  # DETR's L1 and gIoU weights; tiny turns down the two whose gradient outweighed the answer
  # CE's in its shared ConvNeXt (docs/experiments.md, K0-M2).
  box = (1.0, 0.25, 0.05) if preset == "tiny" else (1.0, 1.0, 1.0)
  assert (loss.box_l1, loss.box_giou, loss.box_cell) == box


def test_presets_override_only_what_they_name():
  paper, big, gpu, tiny = (fusion.get_config(p) for p in ("paper", "paper13b", "gpu1b", "tiny"))
  assert (paper.preset, paper.model.llm.hidden_size, paper.model.box.head) == ("paper", 4096, False)
  assert (big.model.llm.hidden_size, big.model.llm.num_layers) == (5120, 40)
  assert big.model.vision.to_dict() == paper.model.vision.to_dict()
  assert (gpu.model.llm.hidden_size, gpu.train.frozen_patterns) == (2048, ())
  assert gpu.model.pixel.sam_vit.global_attn_indexes == (2, 5, 8, 11)
  assert (tiny.model.llm.hidden_size, tiny.model.box.head, tiny.train.batch_size) == (64, True, 8)
  assert tiny.model.pixel.decoder.num_layers == paper.model.pixel.decoder.num_layers  # not named


def test_overrides_keep_shared_references():
  tiny = fusion.get_config("tiny")
  assert tiny.model.vision.convnext.dtype == "float32"  # follows model.vision.dtype
  assert tiny.model.prompt.sae.pretrain_image_size == tiny.model.prompt.map_size == 32
  tiny.model.vision.dtype = "bfloat16"
  assert tiny.model.vision.dino.dtype == "bfloat16"


@pytest.mark.parametrize("overrides", [{"model.llm.hiden_size": 1}, {"model": {"lmm": {}}},
                                       {"model.llm.rope_scaling.factor": 8.0}])
def test_an_override_of_no_field_is_an_error(overrides):
  with pytest.raises(KeyError, match="names no field"):
    fusion.override(fusion.base_config(), overrides)


def test_an_unknown_preset_is_an_error():
  with pytest.raises(ValueError, match="config preset: unknown value 'huge'"):
    fusion.get_config("huge")
