"""Sharded train state and the jitted train step (everything train.py runs per step).

The state is created already sharded: `jax.jit(init, out_shardings=...)` materialises every
parameter and optimizer moment directly in its shard, so the paper preset never exists whole
on one device. Shardings come from the parameters' logical axis names through the one rules
table in `sharding.py`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from earthgptx_jax import batch as batch_lib
from earthgptx_jax import lora, losses, optim, sharding
from earthgptx_jax.models import earthgptx, llama


@flax.struct.dataclass
class TrainState:
  """`trainable` = {"params": model params, "lora": LoRA adapters ({} when LoRA is off)}."""
  step: jax.Array
  trainable: Any
  opt_state: Any
  skipped_steps: jax.Array  # updates skipped because the loss or gradients were not finite

  @property
  def params(self):
    return self.trainable["params"]


def model_params(trainable, config):
  """The params the model runs with: LoRA adapters folded into their kernels."""
  return lora.merge(trainable["params"], trainable["lora"], config.train.lora)


def _lora_enabled(config) -> bool:
  return int(config.train.lora.rank) > 0


def build_model(config: ml_collections.ConfigDict) -> earthgptx.EarthGPTX:
  return earthgptx.EarthGPTX(config.model)


def _init_trainable(model, config, rng):
  example = jax.tree.map(jnp.asarray, batch_lib.example_batch(config, 1))
  model_rng, lora_rng = jax.random.split(rng)
  params = model.init(model_rng, example)["params"]
  adapters = (lora.init(lora_rng, nn.meta.unbox(params), config.train.lora)
              if _lora_enabled(config) else {})
  return {"params": params, "lora": adapters}


def _init_boxed(model, optimizer, config, rng):
  trainable = _init_trainable(model, config, rng)
  return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                    opt_state=optimizer.init(trainable), skipped_steps=jnp.zeros((), jnp.int32))


def make_optimizer(config, model) -> optax.GradientTransformation:
  abstract = jax.eval_shape(functools.partial(_init_trainable, model, config), jax.random.key(0))
  return optim.make_optimizer(config.train, nn.meta.unbox(abstract))


def state_shardings(model, optimizer, config, mesh):
  """(abstract unboxed state, NamedShardings of the state) for `mesh`."""
  with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    boxed = jax.eval_shape(functools.partial(_init_boxed, model, optimizer, config),
                           jax.random.key(0))
  specs = nn.get_partition_spec(boxed)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, sharding.LOGICAL_AXIS_RULES)
  # Here rather than as jax's IndivisibleError deep in init or restore, which names no parameter.
  batch_axes = ("data", "fsdp")
  sharding.check_divisible(nn.meta.unbox(boxed), shardings, mesh, extra={
      "train.batch_size": (int(config.train.batch_size), batch_axes)})
  return nn.meta.unbox(boxed), shardings


def create_state(model, optimizer, config, mesh, rng) -> tuple[TrainState, Any]:
  """Initialises the train state directly into its shards; returns (state, shardings)."""
  _, shardings = state_shardings(model, optimizer, config, mesh)

  def init(rng):
    return nn.meta.unbox(_init_boxed(model, optimizer, config, rng))

  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    lowered = jax.jit(init, out_shardings=shardings).lower(rng)
    # Init runs once: on CPU, skipping LLVM's optimisation passes halves its compile time
    # (hundreds of small RNG fusions) at no cost that matters.
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
    state = lowered.compile(compiler_options=options)(rng)
  return state, shardings


def batch_shardings(config, mesh, batch_size: int):
  return {k: sharding.batch_sharding(mesh, len(shape))
          for k, (shape, _) in batch_lib.batch_shapes(config, batch_size).items()}


def compute_losses(model, config, trainable, batch, num_tasks: int):
  """(total loss, metrics): the named loss terms, whose names are config.loss's keys, "loss" =
  their weighted sum, and counts (answer tokens, masks, boxes, CE per task).

  A new term is one entry in `terms` plus its weight in config.loss.
  """
  params = model_params(trainable, config)
  out = model.apply({"params": params}, batch)
  # The CE term is the first output: on the chunked path no gradient flows through the sums.
  ce, ce_sum, ce_count = llama.token_cross_entropy(
      out, params["llm"], config.model.llm, batch["targets"], batch["loss_mask"],
      str(config.train.get("answer_ce", "token")))
  seg_valid = out.seg_valid & batch["seg_valid"]
  mask = losses.mask_losses(out.mask_logits, batch["seg_masks"], seg_valid)
  box_valid = out.box_valid & batch["box_valid"]
  box = losses.box_losses(out.boxes, batch["box_targets"], box_valid)
  terms = {
      "ce": ce,
      "mask_bce": mask["bce"],
      "mask_dice": mask["dice"],
      "box_l1": box["l1"],
      "box_giou": box["giou"],
      "box_cell": losses.box_cell_loss(out.box_cell_logits, batch["box_targets"], box_valid),
  }
  total = losses.weighted_total(terms, config.loss)
  task_ce_mean, task_count = losses.per_task_mean(ce_sum, ce_count, batch["task_id"], num_tasks)
  metrics = {"loss": total, **terms, "answer_tokens": ce_count.sum(),
             "task_ce_sum": task_ce_mean * task_count, "task_tokens": task_count,
             "masks": jnp.sum(seg_valid), "boxes": box["num_boxes"]}
  return total, metrics


def make_grads_fn(model, config, num_tasks: int, mesh=None):
  """(trainable, batch) -> (grads, metrics), what the train step differentiates.

  Only the trainable leaves are differentiated (`train.frozen_patterns`, optim.py): the frozen
  ones enter the loss as constants, so XLA runs no backward pass through a frozen encoder at the
  input and computes no weight gradient for a frozen weight; their entries in `grads` are zeros
  that nothing reads (the optimizer gives frozen leaves no update).

  With `train.grad_accum_steps` = A, micro-batch i holds rows i, i + A, i + 2A, ... of the
  batch: a (B/A, A) reshape then a transpose, so each device's contiguous block of rows splits
  into its share of every micro-batch and no rows move between devices (a (A, B/A) reshape
  would give each micro-batch to a few devices: an all-gather of the batch). Per-example sums
  do not depend on the rows' order.
  """
  accum = int(config.train.get("grad_accum_steps", 1))
  frozen_patterns = tuple(config.train.get("frozen_patterns", ()))

  def grad_fn(trainable, batch):
    leaves, treedef = jax.tree.flatten(trainable)
    live = jax.tree.leaves(optim.trainable_mask(trainable, frozen_patterns))

    def loss(train_leaves):
      it = iter(train_leaves)
      full = [next(it) if t else jax.lax.stop_gradient(x) for x, t in zip(leaves, live)]
      return compute_losses(model, config, treedef.unflatten(full), batch, num_tasks)

    (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(
        [x for x, t in zip(leaves, live) if t])
    it = iter(grads)
    return treedef.unflatten([next(it) if t else jnp.zeros_like(x)
                              for x, t in zip(leaves, live)]), metrics

  def grads_and_metrics(trainable, batch):
    if accum == 1:
      return grad_fn(trainable, batch)

    def split(x):
      x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
      if mesh is None:
        return x
      return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(
          None, *sharding.batch_sharding(mesh, x.ndim - 1).spec)))
    micro = jax.tree.map(split, batch)

    def body(carry, mb):
      g, m = grad_fn(trainable, mb)
      return jax.tree.map(jnp.add, carry, (g, m)), None

    zeros = jax.eval_shape(grad_fn, trainable, jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
    (grads, metrics), _ = jax.lax.scan(body, zeros, micro)
    scale = 1.0 / accum
    grads = jax.tree.map(lambda g: g * scale, grads)
    for k in ("loss", *config.loss.keys()):  # means; the counts stay summed
      metrics[k] = metrics[k] * scale
    return grads, metrics

  return grads_and_metrics


def make_train_step(model, optimizer, config, mesh, state_sh, num_tasks: int):
  """The jitted step: grad accumulation over micro-batches, NaN-safe update, donated state."""
  accum = int(config.train.get("grad_accum_steps", 1))
  batch_size = int(config.train.batch_size)
  if batch_size % accum:
    raise ValueError(f"train.batch_size={batch_size} is not divisible by "
                     f"train.grad_accum_steps={accum}")
  grads_and_metrics = make_grads_fn(model, config, num_tasks, mesh)
  live = functools.partial(optim.trainable_mask,
                           frozen_patterns=tuple(config.train.get("frozen_patterns", ())))

  def step(state: TrainState, batch):
    grads, metrics = grads_and_metrics(state.trainable, batch)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    new_trainable = optax.apply_updates(state.trainable, updates)
    # Over the trainable leaves only: reading a frozen leaf's gradient would make XLA compute it.
    grad_norm = optim.global_norm(config.train, [
        g for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(live(grads))) if t])
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(step=state.step + 1, trainable=keep(new_trainable, state.trainable),
                           opt_state=keep(new_opt_state, state.opt_state),
                           skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
    # tokens: summed here, on device, so every process gets the global count without fetching
    # the global batch (which spans other processes' devices).
    metrics = dict(metrics, grad_norm=grad_norm, update_skipped=~finite,
                   learning_rate=optim.learning_rate_schedule(config.train)(state.step),
                   tokens=jnp.sum(batch["attention_mask"].astype(jnp.int32)))
    return new_state, metrics

  batch_sh = batch_shardings(config, mesh, batch_size)
  replicated = NamedSharding(mesh, PartitionSpec())
  jitted = jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                   donate_argnums=(0,))

  def run(state, batch):
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
      return jitted(state, batch)

  run.jitted = jitted
  run.grads_and_metrics = grads_and_metrics
  return run


def make_eval_step(model, config, mesh, state_sh, num_tasks: int):
  """Loss metrics on a batch, no update (teacher-forced)."""
  batch_sh = batch_shardings(config, mesh, int(config.train.batch_size))
  replicated = NamedSharding(mesh, PartitionSpec())
  jitted = jax.jit(
      lambda trainable, batch: compute_losses(model, config, trainable, batch, num_tasks)[1],
      in_shardings=(state_sh.trainable, batch_sh), out_shardings=replicated)

  def run(trainable, batch):
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
      return jitted(trainable, batch)
  return run


def global_batch(local_batch: dict[str, np.ndarray], config, mesh):
  """Assembles per-process numpy batches into global jax.Arrays sharded over data x fsdp.

  Each process passes the rows its devices hold (input_feed.data_shards): one block of the
  batch, or all of it when an axis that does not split the batch spans processes. The global
  shape is given, so local rows that do not fit the mesh raise instead of silently making a
  smaller batch."""
  batch_size = int(config.train.batch_size)
  shardings = batch_shardings(config, mesh, batch_size)
  shapes = batch_lib.batch_shapes(config, batch_size)
  return {k: jax.make_array_from_process_local_data(shardings[k], v, shapes[k][0])
          for k, v in local_batch.items()}
