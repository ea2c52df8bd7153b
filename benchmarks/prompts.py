"""Visual-prompt path costs: the rasteriser per prompt kind, and encoder + integration steps.

  python -m benchmarks.prompts [--preset=paper] [--batch_size=1] [--iters=3] [--dtype=float32]
  python -m benchmarks.prompts --skip_model  # rasteriser only (seconds)

Rasteriser: an 800 x 800 image (DIOR-RSVG size), drawn into the global view's prompt map
(model.prompt.map_size) and into a 448 px zoom tile; per call, median of `--repeats` runs.
Model: VisualPromptEncoder + ContentIntegration jitted, max_prompts prompts per example,
(1 + max_tiles) * token_grid**2 image tokens of width C_img (the vision side's mixed width:
ConvNeXt last stage + DINOv2 hidden), LLM width from the preset; forward, and forward +
backward (gradient of every parameter); compile time reported apart.
"""

import statistics
import time

import numpy as np
from absl import app, flags

_PRESET = flags.DEFINE_string("preset", "paper", "configs/fusion.py preset")
_BATCH = flags.DEFINE_integer("batch_size", 1, "examples per model call")
_ITERS = flags.DEFINE_integer("iters", 3, "timed model calls (after one compile call)")
_REPEATS = flags.DEFINE_integer("repeats", 20, "timed rasteriser calls per kind")
_DTYPE = flags.DEFINE_string("dtype", "float32", "compute dtype override (CPU: float32)")
_SKIP_MODEL = flags.DEFINE_bool("skip_model", False, "only time the rasteriser")


def _median_ms(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def bench_rasterizer(config) -> None:
  from data_pipelines import rasterize
  from earthgptx_jax import geometry
  side, view_size, map_size = 800, config.model.vision.image_size, config.model.prompt.map_size
  affines, _, _ = geometry.view_affines(side, side, view_size, max_tiles=4)
  map_affine = rasterize.scale_affine(affines[0], map_size / view_size)
  rng = np.random.default_rng(0)
  angles = np.sort(rng.uniform(0, 2 * np.pi, 50))
  polygon = np.stack([400 + 300 * np.cos(angles), 400 + 250 * np.sin(angles)], 1)
  mask = np.zeros((side, side), bool)
  mask[200:600, 150:500] = True
  prompts = {
      "point": rasterize.Prompt("point", (123.4, 567.8)),
      "box": rasterize.Prompt("box", (100, 200, 500, 650)),
      "polygon (50 vertices)": rasterize.Prompt("polygon", polygon),
      "scribble (20 vertices, w=8)": rasterize.Prompt(
          "scribble", np.cumsum(rng.normal(0, 20, (20, 2)), 0) + 400, width=8),
      "mask (800x800)": rasterize.Prompt("mask", mask=mask),
  }
  print(f"rasteriser, {side}x{side} image; ms per call (median of {_REPEATS.value}):")
  print(f"  {'kind':30s} {f'map {map_size}':>10s} {f'tile {view_size}':>10s}")
  for name, prompt in prompts.items():
    to_map = _median_ms(lambda: rasterize.rasterize(prompt, map_affine, map_size), _REPEATS.value)
    to_tile = _median_ms(lambda: rasterize.rasterize(prompt, affines[1], view_size),
                         _REPEATS.value)
    print(f"  {name:30s} {to_map:10.3f} {to_tile:10.3f}")
  example = list(prompts.values())[:config.model.prompt.max_prompts]
  fields_ms = _median_ms(lambda: rasterize.prompt_fields(
      example, (side, side), affines[0], view_size, map_size, config.model.prompt.max_prompts),
      _REPEATS.value)
  print(f"  prompt_fields, {len(example)} prompts (one example's batch fields): "
        f"{fields_ms:.3f} ms")


def bench_model(config) -> None:
  import jax
  import jax.numpy as jnp

  from earthgptx_jax.models import integration as integration_lib
  from earthgptx_jax.models import prompts
  cfg = config.model.prompt
  cfg.dtype = _DTYPE.value
  b, p, m, k = _BATCH.value, cfg.max_prompts, cfg.map_size, cfg.tokens_per_prompt
  vision = config.model.vision
  n = (1 + vision.max_tiles) * vision.token_grid ** 2
  c_img = vision.convnext.dims[-1] + vision.dino.hidden_size
  llm_width = config.model.llm.hidden_size
  rng = np.random.default_rng(0)
  inputs = dict(
      maps=jnp.asarray(rng.random((b, p, m, m)) > 0.9, jnp.float32),
      geometry=jnp.asarray(np.sort(rng.random((b, p, 4)), -1), jnp.float32),
      types=jnp.asarray(rng.integers(0, 3, (b, p)), jnp.int32),
      valid=jnp.ones((b, p), bool),
      image=jnp.asarray(rng.normal(size=(b, n, c_img)), jnp.float32),
      image_cells=jnp.asarray(np.sort(rng.random((b, n, 2, 2)), -2).reshape(b, n, 4),
                              jnp.float32),
      image_valid=jnp.ones((b, n), bool))
  encoder = prompts.VisualPromptEncoder(cfg)
  integration = integration_lib.ContentIntegration(cfg, llm_width)

  def init(key, x):
    k1, k2 = jax.random.split(key)
    enc = encoder.init(k1, x["maps"], x["geometry"], x["types"], x["valid"])
    embeds = encoder.apply(enc, x["maps"], x["geometry"], x["types"], x["valid"])
    return {"enc": enc, "int": integration.init(k2, x["image"], x["image_cells"],
                                                x["image_valid"], embeds, x["geometry"],
                                                x["valid"])}

  def forward(v, x):
    embeds = encoder.apply(v["enc"], x["maps"], x["geometry"], x["types"], x["valid"])
    image_llm, prompt_llm = integration.apply(v["int"], x["image"], x["image_cells"],
                                              x["image_valid"], embeds, x["geometry"], x["valid"])
    return jnp.mean(image_llm.astype(jnp.float32) ** 2) + jnp.mean(prompt_llm ** 2)

  variables = jax.jit(init)(jax.random.key(0), inputs)
  sizes = jax.tree_util.tree_map(lambda a: a.size, jax.tree_util.tree_leaves(variables))
  print(f"model ({_PRESET.value}, dtype {cfg.dtype}, {jax.devices()[0].platform}): "
        f"B={b} P={p} M={m} K={k} N={n} C_img={c_img} H={llm_width}; "
        f"{sum(sizes) / 1e6:.2f} M parameters")
  for name, fn in [("forward", jax.jit(forward)),
                   ("forward+backward", jax.jit(jax.value_and_grad(forward)))]:
    start = time.perf_counter()
    jax.block_until_ready(fn(variables, inputs))
    compile_s = time.perf_counter() - start
    step_ms = _median_ms(lambda: jax.block_until_ready(fn(variables, inputs)), _ITERS.value)
    print(f"  {name:18s} {step_ms:9.1f} ms/call   (first call incl. compile {compile_s:.1f} s)")


def main(argv):
  del argv
  from configs import fusion
  config = fusion.get_config(_PRESET.value)
  bench_rasterizer(config)
  if not _SKIP_MODEL.value:
    bench_model(config)


if __name__ == "__main__":
  app.run(main)
