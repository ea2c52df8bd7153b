"""The [SEG] path: static-shape gather, PixelDecoder, gradients, post-processing, validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from configs.fusion import get_config
from earthgptx_jax import losses
from earthgptx_jax.models import pixel

SEG_ID = 7
B, L, H, S = 2, 12, 16, 32


def _tiny_pixel_config(image_encoder):
  cfg = get_config("tiny").model.pixel
  cfg.image_encoder = image_encoder
  return cfg


def test_gather_seg_states_positions_order_and_overflow():
  hidden = jnp.arange(B * L * 3, dtype=jnp.float32).reshape(B, L, 3)
  ids = np.zeros((B, L), np.int32)
  ids[0, [2, 9]] = SEG_ID  # two [SEG]
  ids[1, [1, 4, 5]] = SEG_ID  # three: the third exceeds max_seg=2 and is dropped
  states, valid = jax.jit(pixel.gather_seg_states, static_argnums=(2, 3))(
      hidden, jnp.asarray(ids), SEG_ID, 2)
  np.testing.assert_array_equal(np.asarray(states[0]), np.asarray(hidden[0, [2, 9]]))
  np.testing.assert_array_equal(np.asarray(states[1]), np.asarray(hidden[1, [1, 4]]))
  assert np.asarray(valid).all()
  ids[0] = 0  # no [SEG]: invalid slots with zero states
  states, valid = pixel.gather_seg_states(hidden, jnp.asarray(ids), SEG_ID, 3)
  assert not np.asarray(valid[0]).any() and np.asarray(valid[1]).all()
  assert np.all(np.asarray(states[0]) == 0)


@pytest.fixture(scope="module")
def mixed_decoder():
  """Tiny PixelDecoder over a mixed-encoder dense map: params and jitted (loss, grads)."""
  model = pixel.PixelDecoder(_tiny_pixel_config("mixed"))
  dense = jax.random.normal(jax.random.key(1), (B, 4, 4, 24))
  seg = jnp.zeros((B, 2, H))
  # Random params from shapes: compiling `init` (RNG-heavy) costs more than the test itself.
  shapes = nn.meta.unbox(jax.eval_shape(functools.partial(model.init, out_size=S),
                                        jax.random.key(0), seg, jnp.ones((B, 2), bool),
                                        dense_features=dense))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda x: jnp.asarray(rng.normal(0, 0.2, x.shape).astype(np.float32)), shapes)

  def mask_loss(params, hidden, ids, targets, target_valid):
    states, valid = pixel.gather_seg_states(hidden, ids, SEG_ID, 2)
    logits, iou = model.apply(params, states, valid, dense_features=dense, out_size=S)
    out = losses.mask_losses(logits, targets, valid & target_valid)
    return 2.0 * out["bce"] + 0.5 * out["dice"], (logits, iou)

  # One compilation serves both gradient tests.
  return params, jax.jit(jax.value_and_grad(mask_loss, argnums=(0, 1), has_aux=True))


def test_mask_loss_gradient_reaches_only_seg_positions(mixed_decoder):
  params, loss_and_grad = mixed_decoder
  hidden = jax.random.normal(jax.random.key(2), (B, L, H))
  ids = np.zeros((B, L), np.int32)
  ids[0, 3] = SEG_ID
  ids[1, [5, 10]] = SEG_ID
  targets = (jax.random.uniform(jax.random.key(3), (B, 2, S, S)) > 0.5).astype(jnp.float32)
  (value, (logits, iou)), (_, grad) = loss_and_grad(params, hidden, jnp.asarray(ids), targets,
                                                    jnp.ones((B, 2), bool))
  assert logits.shape == (B, 2, S, S) and iou.shape == (B, 2)
  assert np.isfinite(float(value)) and float(value) > 0
  norms = np.abs(np.asarray(grad)).sum(-1)  # [B, L]
  seg = ids == SEG_ID
  assert np.all(norms[seg] > 0), norms
  assert np.all(norms[~seg] == 0), norms


def test_batch_without_seg_gives_zero_mask_loss_and_zero_gradient(mixed_decoder):
  params, loss_and_grad = mixed_decoder
  hidden = jax.random.normal(jax.random.key(4), (B, L, H))
  ids = jnp.zeros((B, L), jnp.int32)
  targets = jnp.zeros((B, 2, S, S))
  (value, _), (g_params, g_hidden) = loss_and_grad(params, hidden, ids, targets,
                                                   jnp.zeros((B, 2), bool))
  assert float(value) == 0.0
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree_util.tree_leaves(g_params))
  assert np.all(np.asarray(g_hidden) == 0)


def test_sam_encoder_path_shapes_and_input_errors():
  cfg = _tiny_pixel_config("sam")
  model = pixel.PixelDecoder(cfg)
  seg, valid = jnp.zeros((1, 2, H)), jnp.ones((1, 2), bool)
  view = jax.random.uniform(jax.random.key(0), (1, S, S, 3))
  params = jax.eval_shape(functools.partial(model.init, out_size=S), jax.random.key(0), seg, valid,
                          sam_pixel_values=view)
  assert "vision_encoder" in params["params"] and "dense_proj" not in params["params"]
  out = jax.eval_shape(functools.partial(model.apply, out_size=S), params, seg, valid,
                       sam_pixel_values=view)
  assert out[0].shape == (1, 2, S, S) and out[1].shape == (1, 2)
  with pytest.raises(ValueError, match="sam_pixel_values"):
    model.init(jax.random.key(0), seg, valid, dense_features=jnp.zeros((1, 4, 4, 8)), out_size=S)
  cfg.image_encoder = "clip"
  with pytest.raises(ValueError, match="image_encoder.*'clip'"):
    pixel.PixelDecoder(cfg).init(jax.random.key(0), seg, valid, sam_pixel_values=view, out_size=S)


@pytest.mark.parametrize("original_hw", [(37, 53), (120, 90), (64, 64), (200, 30)])
def test_postprocess_masks_matches_hf_post_process_masks(original_hw):
  from transformers import SamImageProcessor
  from earthgptx_jax.geometry import global_view_shape

  low_res = np.random.default_rng(0).normal(size=(1, 2, 16, 16)).astype(np.float32)
  processor = SamImageProcessor()
  reshaped = global_view_shape(*original_hw, S)
  want = processor.post_process_masks([torch.from_numpy(low_res)], [list(original_hw)],
                                      [list(reshaped)], pad_size={"height": S, "width": S},
                                      binarize=False)[0].numpy()
  got = pixel.postprocess_masks(low_res, original_hw, S)
  assert got.shape == (1, 2, *original_hw) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)  # HF computes in float32
  binary = pixel.postprocess_masks(low_res, original_hw, S, binarize=True)
  np.testing.assert_array_equal(binary, want > 0.0)


@pytest.mark.parametrize("r,size", [(256, 64), (16, 256), (64, 64)])
def test_bilinear_resize_matrix_is_torch_interpolate(r, size):
  """Each axis's matrix reproduces torch's bilinear resize (align_corners=False), both ways."""
  x = np.random.default_rng(1).normal(size=(1, 1, r, r))
  for out in (size, 37):
    want = torch.nn.functional.interpolate(torch.from_numpy(x), (out, out), mode="bilinear",
                                           align_corners=False).numpy()[0, 0]
    m = pixel.bilinear_resize_matrix(r, out)
    np.testing.assert_allclose(m @ x[0, 0] @ m.T, want, atol=1e-12)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)


def test_mask_to_box_tight_and_empty():
  mask = np.zeros((3, 10, 12), bool)
  mask[0, 2:5, 3:8] = True
  mask[1, 9, 0] = True
  boxes, nonempty = pixel.mask_to_box(jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(boxes), [[3, 2, 8, 5], [0, 9, 1, 10], [0, 0, 0, 0]])
  np.testing.assert_array_equal(np.asarray(nonempty), [True, True, False])
  # Same as SAM's own box (inclusive last pixel) plus one.
  from transformers.models.sam.image_processing_sam import _batched_mask_to_box
  sam = _batched_mask_to_box(torch.from_numpy(mask[:2])).numpy()
  np.testing.assert_array_equal(np.asarray(boxes[:2]), sam + [0, 0, 1, 1])


def test_validate_seg_targets_errors():
  masks = np.zeros((2, 30, 40), np.uint8)
  pixel.validate_seg_targets(2, masks, (30, 40), max_seg=3)
  pixel.validate_seg_targets(0, np.zeros((0, 30, 40)), (30, 40))
  with pytest.raises(ValueError, match=r"\[SEG\] count.*3 \[SEG\].*2 target"):
    pixel.validate_seg_targets(3, masks, (30, 40))
  with pytest.raises(ValueError, match=r"mask size \(30, 40\).*image size \(40, 30\)"):
    pixel.validate_seg_targets(2, masks, (40, 30))
  with pytest.raises(ValueError, match="max_seg=1"):
    pixel.validate_seg_targets(2, masks, (30, 40), max_seg=1)
  with pytest.raises(ValueError, match=r"\[num_masks, height, width\]"):
    pixel.validate_seg_targets(1, masks[0], (30, 40))
  with pytest.raises(ValueError, match="0/1"):
    pixel.validate_seg_targets(2, masks + 255, (30, 40))


def _sirst_samples(shared_data, min_area=40, limit=3):
  """(stem, image_hw, mask [H, W] bool, xml box) for single-target SIRST images."""
  import xml.etree.ElementTree as ET
  from PIL import Image
  root = shared_data / "SIRST"
  out = []
  for png in sorted((root / "masks").glob("*_pixels0.png")):
    stem = png.name[:-len("_pixels0.png")]
    mask = np.asarray(Image.open(png))
    mask = (mask[..., 0] if mask.ndim == 3 else mask) > 0
    objects = ET.parse(root / "masks" / f"{stem}.xml").getroot().findall("object")
    if len(objects) != 1 or mask.sum() < min_area:
      continue
    box = [int(objects[0].find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
    width, height = Image.open(root / "images" / f"{stem}.png").size
    out.append((stem, (height, width), mask, box))
    if len(out) == limit:
      break
  return out


def test_real_sirst_masks_validate_box_and_survive_the_global_view(shared_data):
  """Real IR masks: pass validation, give their annotated box (VOC, +-1 px), and come back
  from the global-view frame through postprocess_masks with high IoU."""
  from data_pipelines import views
  from earthgptx_jax import geometry
  samples = _sirst_samples(shared_data)
  assert samples, "no single-target SIRST sample found"
  for stem, image_hw, mask, xml_box in samples:
    pixel.validate_seg_targets(1, mask[None].astype(np.uint8), image_hw)
    box, nonempty = pixel.mask_to_box(jnp.asarray(mask))
    assert bool(nonempty)
    assert np.abs(np.asarray(box) - xml_box).max() <= 1, (stem, np.asarray(box), xml_box)
    size = 256
    affine = geometry.view_affines(*image_hw, size, 0)[0][0]
    soft = views.warp_to_view(mask.astype(np.float32), affine, size, order=1)
    back = np.asarray(pixel.postprocess_masks(jnp.asarray(4 * soft - 2), image_hw, size,
                                              binarize=True))
    iou = (back & mask).sum() / (back | mask).sum()
    assert iou > 0.75, (stem, iou)
