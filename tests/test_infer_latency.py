"""What makes a repeated `infer` call fast, pinned: the params restore reads the checkpoint's own
shapes (no model trace) and gives what the traced restore gives, LoRA adapters merged."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from earthgptx_jax import checkpointing, cli, export, programs, trainer
from model_fixtures import tiny_config


def test_one_device_restore_without_a_model_trace_equals_the_traced_one(tmp_path, monkeypatch):
  config = tiny_config()
  config.train.lora.rank = 2
  model = trainer.build_model(config)
  shapes = trainer.nn.meta.unbox(jax.eval_shape(
      functools.partial(trainer._init_trainable, model, config), jax.random.key(0)))  # noqa: SLF001
  rng = np.random.default_rng(0)
  trainable = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype),
                           shapes)
  assert jax.tree.leaves(trainable["lora"])
  export.save_workdir(config, trainable, tmp_path / "run", step=4)
  mesh = trainer.sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  _, traced = checkpointing.load_params(tmp_path / "run", config, mesh=mesh)
  with monkeypatch.context() as m:  # the one-device path never traces the model
    m.setattr(checkpointing, "_abstract_trainable", None)
    step, params = checkpointing.load_params(tmp_path / "run", config)
  assert step == 4
  assert jax.tree.structure(params) == jax.tree.structure(traced)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(traced)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  merged = trainer.model_params(trainable, config)  # LoRA folded in, as the traced path does
  np.testing.assert_array_equal(np.asarray(jax.tree.leaves(params)[0]),
                                np.asarray(jax.tree.leaves(merged)[0]))


def test_a_readers_compilation_cache_is_never_inside_the_workdir_it_reads(tmp_path, monkeypatch):
  """infer / evaluate / the demo reuse the training run's XLA cache, unless it lies inside the
  workdir: XLA writes each new program there, and a reader writes nothing into its workdir."""
  used = []
  monkeypatch.setattr(cli, "use_compilation_cache", used.append)
  for name, cache in (("outside", tmp_path / "xla"), ("inside", tmp_path / "inside" / "xla")):
    (tmp_path / name).mkdir()
    config = tiny_config(compilation_cache_dir=str(cache))
    (tmp_path / name / "config.json").write_text(config.to_json())
  cli.use_workdir_compilation_cache(str(tmp_path / "outside"))
  monkeypatch.chdir(tmp_path)
  cli.use_workdir_compilation_cache("inside/.")  # however the flag spells the folder
  assert used == [str(tmp_path / "xla")]


def test_a_stored_program_is_not_traced_again_and_computes_the_same(tmp_path):
  traced = []

  def jitted():  # a new function each time, as in a new process (JAX caches traces per function)
    def f(x, y):
      traced.append(x.shape)
      return {"product": jnp.sin(x) @ y, "sum": x.sum()}
    return jax.jit(f)

  rng = np.random.default_rng(0)
  x, y = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((3, 4), (4, 5)))
  want = jitted()(x, y)
  traced.clear()
  assert jax.tree.map(np.asarray, programs.Stored(jitted(), "f", tmp_path, "model")(x, y))
  assert traced == [(3, 4)]  # exported once, into tmp_path
  traced.clear()
  again = programs.Stored(jitted(), "f", tmp_path, "model")  # as a new process makes it
  got = again(x, y)
  assert traced == []
  for key in want:
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))
  again(x[:2], y)  # another signature, another program
  programs.Stored(jitted(), "f", tmp_path, "another model")(x, y)
  assert traced == [(2, 4), (3, 4)]
  files = sorted(tmp_path.glob("f-*.jax_exported"))
  assert len(files) == 3
  for path in files:  # an unreadable entry is exported again
    path.write_bytes(b"not a program")
  traced.clear()
  got = programs.Stored(jitted(), "f", tmp_path, "model")(x, y)
  assert traced == [(3, 4)]
  np.testing.assert_array_equal(np.asarray(got["sum"]), np.asarray(want["sum"]))
