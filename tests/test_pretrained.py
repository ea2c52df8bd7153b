"""Starting a run from local pretrained weights: what is loaded lands, placed and sized."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from earthgptx_jax import batch as batch_lib
from earthgptx_jax import pretrained, trainer
from earthgptx_jax.convert import llama as convert_llama
from earthgptx_jax.convert import sam as convert_sam
from model_fixtures import tiny_config


@pytest.fixture(scope="module")
def model_and_zero_params():
  config = tiny_config()
  model = trainer.build_model(config)
  example = jax.tree.map(jnp.asarray, batch_lib.example_batch(config, 1))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), example)["params"])
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        trainer.nn.meta.unbox(shapes))
  return config, params


def _hf_llama(folder, llm, vocab):
  torch.manual_seed(0)
  hf = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
      num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads,
      num_key_value_heads=llm.num_kv_heads, head_dim=llm.head_dim,
      rms_norm_eps=llm.rms_norm_eps, tie_word_embeddings=llm.tie_word_embeddings)
  transformers.LlamaForCausalLM(hf).save_pretrained(folder)


def test_llm_and_sam_load_in_place_of_random_init(tmp_path, model_and_zero_params):
  config, params = model_and_zero_params
  config = tiny_config()
  llm_dir, sam_dir = tmp_path / "llm", tmp_path / "sam"
  base_vocab = config.model.llm.vocab_size - 7  # the project's special tokens are appended
  _hf_llama(llm_dir, config.model.llm, base_vocab)
  rng = np.random.default_rng(0)
  sam_params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                            params["pixel"])
  convert_sam.save_hf_sam(sam_params, config.model.pixel, sam_dir)
  config.model.llm.pretrained_path = str(llm_dir)
  config.model.pixel.pretrained_path = str(sam_dir)
  messages = []
  loaded = pretrained.load_into(params, config, log=messages.append)

  _, want_llm = convert_llama.load_hf_llama(llm_dir, config.model.llm)
  emb = np.asarray(loaded["llm"]["embed_tokens"]["embedding"])
  want_emb = np.asarray(want_llm["embed_tokens"]["embedding"])
  np.testing.assert_array_equal(emb[:base_vocab], want_emb)
  np.testing.assert_allclose(emb[base_vocab:], np.broadcast_to(want_emb.astype(np.float64).mean(0), (7, emb.shape[1])),
                             rtol=1e-6)
  np.testing.assert_array_equal(
      np.asarray(loaded["llm"]["layers_1"]["self_attn"]["q_proj"]["kernel"]),
      np.asarray(want_llm["layers_1"]["self_attn"]["q_proj"]["kernel"]))
  for sub in ("vision_encoder", "prompt_encoder", "mask_decoder"):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded["pixel"][sub]),
                 sam_params[sub])
  # The new [SEG] projection and the untouched components keep their own (here zero) values.
  assert not np.asarray(loaded["pixel"]["seg_fc1"]["kernel"]).any()
  text = "\n".join(messages)
  assert f"llm: pretrained from {llm_dir}" in text
  assert f"pretrained from {sam_dir}" in text
  assert "vision: random init" in text
  for leaf, ref in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    assert leaf.shape == ref.shape and leaf.dtype == ref.dtype


def test_mismatched_llm_is_refused_by_name(tmp_path, model_and_zero_params):
  _, params = model_and_zero_params
  config = tiny_config()
  other = tiny_config()
  other.model.llm.intermediate_size = 96
  _hf_llama(tmp_path / "llm", other.model.llm, config.model.llm.vocab_size)
  config.model.llm.pretrained_path = str(tmp_path / "llm")
  with pytest.raises(ValueError, match="intermediate_size"):
    pretrained.load_into(params, config, log=lambda m: None)


# A SamModel whose sizes all differ from the tiny preset's (decoder 32 wide, ViT 32 wide, 2
# layers, window 4, ...): the folder's config.json must decide them.
_OTHER_SAM = dict(
    vision_config=dict(hidden_size=24, output_channels=16, num_hidden_layers=1,
                       num_attention_heads=3, image_size=64, patch_size=8, mlp_dim=40,
                       window_size=2, global_attn_indexes=[0], num_pos_feats=8),
    prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8,
                               mask_input_channels=8),
    mask_decoder_config=dict(hidden_size=16, mlp_dim=24, num_hidden_layers=1,
                             num_attention_heads=2, iou_head_depth=2, iou_head_hidden_dim=12))


def _hf_sam(folder, **changes):
  sizes = {k: dict(v) for k, v in _OTHER_SAM.items()}
  for key, value in changes.items():
    sub, field = key.split(".")
    sizes[sub][field] = value
  torch.manual_seed(0)
  transformers.SamModel(transformers.SamConfig(**sizes)).save_pretrained(folder)


def test_sam_sizes_come_from_the_folders_config_json(tmp_path):
  """model.pixel.pretrained_path names a SamModel of other sizes than the preset's: the
  config takes the folder's sizes (one log line), the model built from it loads the folder's
  weights, and the loaded PixelDecoder runs."""
  from earthgptx_jax.models import pixel as pixel_lib
  sam_dir = tmp_path / "sam"
  _hf_sam(sam_dir)
  config = tiny_config()
  config.model.pixel.pretrained_path = str(sam_dir)
  messages = []
  pretrained.resolve_config(config, log=messages.append)
  dec, vit = config.model.pixel.decoder, config.model.pixel.sam_vit
  assert (dec.hidden_size, dec.num_layers, dec.num_heads, dec.mlp_dim, dec.iou_head_depth,
          dec.iou_head_hidden_dim, dec.mask_input_channels) == (16, 1, 2, 24, 2, 12, 8)
  assert (vit.hidden_size, vit.num_layers, vit.num_heads, vit.mlp_dim, vit.window_size,
          tuple(vit.global_attn_indexes)) == (24, 1, 3, 40, 2, (0,))
  assert dec.attention_impl == "xla" and config.model.pixel.dtype == "float32"  # runtime: ours
  (line,) = [m for m in messages if m.startswith("pixel: sizes from")]
  assert "model.pixel.decoder.hidden_size 32 -> 16" in line
  assert "model.pixel.sam_vit.num_layers 2 -> 1" in line

  model = trainer.build_model(config)
  example = jax.tree.map(jnp.asarray, batch_lib.example_batch(config, 1))
  shapes = trainer.nn.meta.unbox(jax.eval_shape(
      lambda: model.init(jax.random.key(0), example)["params"]))
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  loaded = pretrained.load_into(params, config, log=messages.append)
  want = convert_sam.load_hf_sam(sam_dir, config.model.pixel)
  for sub in ("vision_encoder", "prompt_encoder", "mask_decoder"):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded["pixel"][sub]),
                 want[sub])
  decoder = pixel_lib.PixelDecoder(config.model.pixel)
  seg = jnp.ones((1, 1, config.model.llm.hidden_size), jnp.float32)
  masks, iou = decoder.apply({"params": loaded["pixel"]}, seg, jnp.ones((1, 1), bool),
                             sam_pixel_values=jnp.full((1, 64, 64, 3), 0.5), out_size=64)
  assert masks.shape == (1, 1, 64, 64) and np.isfinite(np.asarray(masks)).all()
  assert iou.shape == (1, 1)


def test_sam_config_is_checked_before_loading(tmp_path, model_and_zero_params):
  _, params = model_and_zero_params
  # Loading without resolve_config: the preset's sizes are refused by field, not by tensor.
  _hf_sam(tmp_path / "sam")
  config = tiny_config()
  config.model.pixel.pretrained_path = str(tmp_path / "sam")
  with pytest.raises(ValueError, match=r"model\.pixel\.decoder\.hidden_size=32 .* has 16"):
    pretrained.load_into(params, config, log=lambda m: None)
  # Something the modules do not implement is refused by name.
  _hf_sam(tmp_path / "abs", **{"vision_config.use_rel_pos": False})
  config.model.pixel.pretrained_path = str(tmp_path / "abs")
  with pytest.raises(ValueError, match=r"vision_config\.use_rel_pos=False is not supported"):
    pretrained.resolve_config(config, log=lambda m: None)
  # A folder without config.json names the config field.
  (tmp_path / "bare").mkdir()
  config.model.pixel.pretrained_path = str(tmp_path / "bare")
  with pytest.raises(ValueError, match=r"model\.pixel\.pretrained_path: .* has no config\.json"):
    pretrained.resolve_config(config, log=lambda m: None)


def test_mixed_mode_takes_only_the_decoder_sizes(tmp_path):
  _hf_sam(tmp_path / "sam")
  config = tiny_config()
  config.model.pixel.image_encoder = "mixed"
  config.model.pixel.pretrained_path = str(tmp_path / "sam")
  vit_before = config.model.pixel.sam_vit.to_dict()
  pretrained.resolve_config(config, log=lambda m: None)
  assert config.model.pixel.decoder.hidden_size == 16
  assert config.model.pixel.sam_vit.to_dict() == vit_before  # the folder's ViT is not used
