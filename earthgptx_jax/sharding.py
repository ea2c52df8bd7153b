"""Logical axis names -> mesh axes, and mesh construction.

Every parameter is created with `nn.with_logical_partitioning(init, names)` and every large
activation is constrained with `nn.with_logical_constraint(x, names)`. The table below is the
only place where those logical names meet the physical mesh `('data', 'fsdp', 'tensor')`;
changing how a model is split is a change to this table or to `config.mesh`, never to a module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.experimental.mesh_utils
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axes). First match wins; a name missing from the table is replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # Activations.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # Parameters: FSDP over the model width, tensor parallelism over heads / MLP / vocab.
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # Vision / prompt / pixel modules (convolutions and ViTs).
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("vit_embed", "fsdp"),
    ("vit_mlp", "tensor"),
    ("vit_heads", "tensor"),
    ("vit_head_dim", None),
    ("tokens", None),
)


def logical_axis_rules():
  """Rules in the form flax's `nn.logical_axis_rules` and `nn.logical_to_mesh_*` expect."""
  return LOGICAL_AXIS_RULES


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills one `-1` entry so that the product equals `num_devices`."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh.shape: expected {len(MESH_AXES)} entries for axes {MESH_AXES}, "
                     f"got {shape}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh.shape: entries must be positive with at most one -1, got {shape}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh.shape: {shape} does not divide {num_devices} devices")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh.shape: {shape} needs {math.prod(shape)} devices, have {num_devices}")
  return shape


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices=None, *,
              dcn_shape: Sequence[int] | None = None) -> jax.sharding.Mesh:
  """A mesh over `('data', 'fsdp', 'tensor')` with Auto axis types (logical rules need Auto).

  dcn_shape: how many slices (TPU) or processes (CPU/GPU) each axis spans, e.g. (2, 1, 1) puts
  the data axis across two slices; `shape` is then the mesh within one slice / process
  (`mesh_utils.create_hybrid_device_mesh`), and the whole mesh is their product.
  """
  devices = jax.devices() if devices is None else list(devices)
  if dcn_shape is not None:
    dcn = tuple(int(s) for s in dcn_shape)
    granules = math.prod(dcn)
    if len(dcn) != len(MESH_AXES) or len(devices) % granules:
      raise ValueError(f"mesh.dcn_shape: {dcn} must have {len(MESH_AXES)} entries whose product "
                       f"divides the {len(devices)} devices")
    inner = resolve_mesh_shape(shape, len(devices) // granules)
    on_tpu = devices[0].platform == "tpu"
    grid = jax.experimental.mesh_utils.create_hybrid_device_mesh(
        inner, dcn, devices, process_is_granule=not on_tpu, allow_split_physical_axes=True)
    return jax.sharding.Mesh(grid, MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
  shape = resolve_mesh_shape(shape, len(devices))
  if devices == jax.devices():
    return jax.make_mesh(shape, MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_shardings(logical_specs, mesh: jax.sharding.Mesh):
  """Pytree of logical PartitionSpecs (from `nn.get_partition_spec`) -> NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_AXIS_RULES)


class MeshMismatchError(ValueError):
  """A parameter (or the batch) cannot be split evenly over the mesh: one line naming it."""


def check_divisible(abstract_tree, shardings, mesh: jax.sharding.Mesh, *,
                    extra: dict[str, tuple[int, Sequence[str]]] | None = None) -> None:
  """Raises MeshMismatchError naming the first array of `abstract_tree` (ShapeDtypeStructs) whose
  dimension is not divisible by the mesh axes `shardings` split it over, with the mesh shapes
  over the same devices that would fit. `extra`: {name: (size, mesh axes)} checked too (e.g.
  the batch over data x fsdp)."""
  problem = _first_indivisible(abstract_tree, shardings, dict(mesh.shape), extra or {})
  if problem is None:
    return
  what, size, axes = problem
  num_devices = math.prod(mesh.shape.values())
  fitting = [shape for shape in _mesh_shapes(num_devices)
             if _first_indivisible(abstract_tree, shardings, dict(zip(MESH_AXES, shape)),
                                   extra or {}) is None]
  sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
  if len(axes) > 1:
    sizes += f" = {math.prod(mesh.shape[a] for a in axes)}"
  hint = ("; fits: " + ", ".join(f"--config.mesh.shape='{s}'" for s in fitting[:4])
          if fitting else f"; no mesh over {num_devices} devices fits")
  raise MeshMismatchError(
      f"config.mesh.shape={tuple(mesh.shape.values())} (axes {dict(mesh.shape)}) does not fit "
      f"{what}: {size} is not divisible by {sizes}" + hint)


def _first_indivisible(abstract_tree, shardings, axis_sizes: dict[str, int],
                       extra: dict[str, tuple[int, Sequence[str]]]):
  """(description, size, mesh axes) of the first dimension that does not split evenly."""
  for name, (size, axes) in extra.items():
    if size % math.prod(axis_sizes[a] for a in axes):
      return name, size, tuple(axes)
  leaves = jax.tree_util.tree_leaves_with_path(abstract_tree)
  specs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), sh in zip(leaves, specs):
    for dim, entry in enumerate(tuple(sh.spec)[:len(leaf.shape)]):
      axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
      if axes and leaf.shape[dim] % math.prod(axis_sizes[a] for a in axes):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                        for k in path)
        return (f"{name} of shape {tuple(leaf.shape)} "
                f"(dimension {dim})", leaf.shape[dim], axes)
  return None


def _mesh_shapes(num_devices: int) -> list[tuple[int, int, int]]:
  """Every (data, fsdp, tensor) over `num_devices`, FSDP-heavy first (the default (1, -1, 1))."""
  divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
  shapes = [(d, f, num_devices // (d * f)) for d in divisors for f in divisors
            if num_devices % (d * f) == 0]
  return sorted(shapes, key=lambda s: (-s[1], s[2], s[0]))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dimension split over data and fsdp; the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def wait_for_all_processes(name: str, timeout_s: int = 3600) -> None:
  """Blocks until every process reaches the barrier `name` (no-op with one process).

  Call it after each process compiled a program, before running it: processes compile at
  different speeds, and on CPU the first collective gives a late peer only 30 s (gloo's fixed
  key-value timeout). The barrier lives in the coordination service, not in a collective, so
  it waits as long as `timeout_s`.
  """
  import orbax.checkpoint as ocp  # the coordination-service barrier, without private jax API
  ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=int(timeout_s * 1000))
