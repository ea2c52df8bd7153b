"""SAM ViT attention without a materialised bias, its remat, the frozen-encoder preset entry."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from configs import fusion
from earthgptx_jax import batch as batch_lib
from earthgptx_jax import optim, trainer
from earthgptx_jax.models import attention, sam_vit


def test_rel_pos_attention_equals_attention_with_a_full_bias():
  rs = np.random.RandomState(0)
  b, h, w, n, c = 2, 3, 4, 2, 8
  q, k, v = (jnp.asarray(rs.randn(b, h, w, n, c).astype(np.float32)) for _ in range(3))
  bias_h = jnp.asarray(rs.randn(b, n, h, w, h).astype(np.float32))
  bias_w = jnp.asarray(rs.randn(b, n, h, w, w).astype(np.float32))
  full = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(b, n, h * w, h * w)
  flat = lambda x: x.reshape(b, h * w, n, c)  # noqa: E731
  want = attention.dot_product_attention(flat(q), flat(k), flat(v), bias=full)
  got = sam_vit.rel_pos_attention(q, k, flat(v), bias_h, bias_w)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _encoder(remat: bool):
  cfg = fusion.get_config("tiny").model.pixel.sam_vit
  cfg.update(image_size=48, patch_size=8, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32,
             window_size=4, global_attn_indexes=(1,), remat=remat)
  return sam_vit.SamVisionEncoder(cfg, 8)


def test_sam_remat_gives_identical_outputs_and_grads():
  x = jnp.asarray(np.random.RandomState(1).randn(2, 48, 48, 3).astype(np.float32))
  params = _encoder(False).init(jax.random.key(0), x)["params"]
  assert jax.tree.structure(params) == jax.tree.structure(
      _encoder(True).init(jax.random.key(0), x)["params"])

  def run(remat):
    model = _encoder(remat)
    loss = lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, x)))  # noqa: E731
    return jax.jit(jax.value_and_grad(loss))(params)

  (want, want_grads), (got, got_grads) = run(False), run(True)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    # Same math; remat may only change XLA's fusion, hence float32 rounding.
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()))


def test_paper_presets_remat_sam_and_freeze_its_encoder_only():
  paper = fusion.get_config("paper")
  assert paper.model.pixel.sam_vit.remat
  assert fusion.FROZEN_SAM_ENCODER in paper.train.frozen_patterns
  config = fusion.get_config("tiny")
  vocab = config.model.llm.vocab_size
  config.model.token_ids.update(dict(bos=1, eos=2, pad=0, box=vocab - 4, image_patch=vocab - 3,
                                     vp_patch=vocab - 2, seg=vocab - 1))
  example = jax.tree.map(jnp.asarray, batch_lib.example_batch(config, 1))
  shapes = nn.meta.unbox(jax.eval_shape(
      lambda: trainer.build_model(config).init(jax.random.key(0), example)))
  frozen = optim.match_paths({"params": shapes["params"]}, [fusion.FROZEN_SAM_ENCODER])
  paths = {optim.path_str(p): f for p, f in jax.tree_util.tree_leaves_with_path(frozen)}
  sam = {p for p in paths if p.startswith("params/pixel/vision_encoder/")}
  assert sam and all(paths[p] for p in sam)
  assert not any(f for p, f in paths.items() if p not in sam)
