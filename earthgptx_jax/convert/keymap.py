"""Declarative, reversible weight maps (MaxText style).

A converter is a list of `Rule`s: a PyTorch state-dict key, a Flax param path, and an ordered
tuple of per-tensor `Transform`s. `to_flax` applies the transforms in order; `to_torch` applies
their inverses in reverse order, so both directions come from one table and round trips are
exact by construction. Keys may hold `{i}` (and `{j}`) placeholders, expanded by `expand`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np
from safetensors import safe_open


@dataclasses.dataclass(frozen=True)
class Transform:
  """A tensor transform with its exact inverse; `name` appears in error messages."""
  name: str
  forward: Callable[[np.ndarray], np.ndarray]
  inverse: Callable[[np.ndarray], np.ndarray]


def transpose(axes: Sequence[int]) -> Transform:
  axes = tuple(axes)
  return Transform(f"transpose{axes}", lambda x: np.transpose(x, axes),
                   lambda x: np.transpose(x, tuple(np.argsort(axes))))


LINEAR = transpose((1, 0))  # torch Linear [out, in] <-> flax Dense kernel [in, out]
CONV2D = transpose((2, 3, 1, 0))  # torch Conv2d [O, I, kh, kw] <-> flax Conv [kh, kw, I, O]


def reshape(torch_shape: Sequence[int], flax_shape: Sequence[int]) -> Transform:
  torch_shape, flax_shape = tuple(torch_shape), tuple(flax_shape)
  return Transform(f"reshape{torch_shape}->{flax_shape}", lambda x: x.reshape(flax_shape),
                   lambda x: x.reshape(torch_shape))


@dataclasses.dataclass(frozen=True)
class Rule:
  torch_key: str
  flax_path: str  # '/'-separated path into the params tree
  transforms: tuple[Transform, ...] = ()


def expand(rules: Iterable[Rule], **ranges: int) -> list[Rule]:
  """Expands `{i}`-style placeholders: `expand(rules, i=num_layers)`."""
  out = []
  for rule in rules:
    names = [n for n in ranges if "{" + n + "}" in rule.torch_key + rule.flax_path]
    combos = [{}]
    for n in names:
      combos = [dict(c, **{n: k}) for c in combos for k in range(ranges[n])]
    for c in combos:
      out.append(dataclasses.replace(rule, torch_key=rule.torch_key.format(**c),
                                     flax_path=rule.flax_path.format(**c)))
  return out


def flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
  flat = {}
  for k, v in tree.items():
    path = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      flat.update(flatten(v, path))
    else:
      flat[path] = v
  return flat


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


class ConversionError(ValueError):
  """A checkpoint that does not fit the module: names the key and the shapes."""


def to_flax(state_dict: Mapping[str, np.ndarray], rules: Sequence[Rule], *,
            expected: Mapping | None = None, strict: bool = True) -> dict:
  """PyTorch state dict (numpy values) -> nested Flax params.

  `expected` (a params tree of arrays or ShapeDtypeStructs) checks every shape; `strict`
  rejects state-dict keys that no rule consumes.
  """
  expected_flat = flatten(expected) if expected is not None else None
  flat = {}
  for rule in rules:
    if rule.torch_key not in state_dict:
      raise ConversionError(f"missing tensor {rule.torch_key!r} (for {rule.flax_path})")
    x = np.asarray(state_dict[rule.torch_key])
    for t in rule.transforms:
      try:
        x = t.forward(x)
      except ValueError as e:
        raise ConversionError(f"tensor {rule.torch_key!r} of shape {np.shape(state_dict[rule.torch_key])}"
                              f" does not fit {t.name}: {e}") from None
    if expected_flat is not None:
      if rule.flax_path not in expected_flat:
        raise ConversionError(f"param {rule.flax_path!r} (from {rule.torch_key!r}) is not in the module")
      want = tuple(expected_flat[rule.flax_path].shape)
      if tuple(x.shape) != want:
        raise ConversionError(f"shape mismatch for {rule.torch_key!r}: checkpoint gives "
                              f"{tuple(np.shape(state_dict[rule.torch_key]))} -> {tuple(x.shape)}, "
                              f"module param {rule.flax_path!r} has {want}")
    flat[rule.flax_path] = x
  if strict:
    unused = sorted(set(state_dict) - {r.torch_key for r in rules})
    if unused:
      raise ConversionError(f"unexpected tensors in checkpoint (first of {len(unused)}): {unused[:5]}")
  if expected_flat is not None:
    missing = sorted(set(expected_flat) - set(flat))
    if missing:
      raise ConversionError(f"module params not provided by the checkpoint: {missing[:5]}")
  return unflatten(flat)


def to_torch(params: Mapping, rules: Sequence[Rule]) -> dict[str, np.ndarray]:
  """Nested Flax params -> PyTorch state dict (numpy values), inverting every transform."""
  flat = flatten(params)
  out = {}
  for rule in rules:
    if rule.flax_path not in flat:
      raise ConversionError(f"missing param {rule.flax_path!r} (for {rule.torch_key})")
    x = np.asarray(flat[rule.flax_path])
    for t in reversed(rule.transforms):
      x = t.inverse(x)
    out[rule.torch_key] = np.ascontiguousarray(x)
  return out


# ----------------------------------------------------------------------------------------------
# Safetensors folders (single file or sharded with an index), no pickle anywhere.

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file, or of a folder (single file or sharded index)."""
  path = pathlib.Path(path)
  if path.is_file():
    return _load_file_any_dtype(path)
  index = path / SAFETENSORS_INDEX
  if index.is_file():
    weight_map = json.loads(index.read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
      tensors.update(_load_file_any_dtype(path / shard))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
      raise ConversionError(f"{index}: tensors listed but absent from shards: {missing[:5]}")
    return tensors
  single = path / SAFETENSORS_SINGLE
  if single.is_file():
    return _load_file_any_dtype(single)
  files = sorted(path.glob("*.safetensors"))
  if len(files) == 1:
    return _load_file_any_dtype(files[0])
  raise ConversionError(f"{path}: no {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or single "
                        f"*.safetensors file")


def _load_file_any_dtype(file: pathlib.Path) -> dict[str, np.ndarray]:
  """safetensors.numpy cannot hold bfloat16; read through torch then view as ml_dtypes."""
  out = {}
  with safe_open(str(file), framework="pt") as f:
    for key in f.keys():
      t = f.get_tensor(key)
      if str(t.dtype) == "torch.bfloat16":
        import torch  # lazy: torch / transformers load only when weights are converted
        out[key] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
      else:
        out[key] = t.numpy()
  return out


def save_safetensors(tensors: Mapping[str, np.ndarray], folder: str | os.PathLike, *,
                     max_shard_bytes: int | None = None, metadata: Mapping[str, str] | None = None
                     ) -> None:
  """Writes `model.safetensors` (or shards + index) that transformers' from_pretrained loads."""
  import torch  # lazy: torch / transformers load only when weights are converted
  from safetensors.torch import save_file  # lazy: torch / transformers load only when weights are converted

  def as_torch(x):
    x = np.ascontiguousarray(x)
    if x.dtype == ml_dtypes.bfloat16:
      return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)

  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  meta = {"format": "pt", **(metadata or {})}
  keys = list(tensors)
  if max_shard_bytes is None or sum(np.asarray(tensors[k]).nbytes for k in keys) <= max_shard_bytes:
    save_file({k: as_torch(tensors[k]) for k in keys}, str(folder / SAFETENSORS_SINGLE), meta)
    return
  shards, current, size = [], [], 0
  for k in keys:
    nbytes = np.asarray(tensors[k]).nbytes
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(k)
    size += nbytes
  shards.append(current)
  weight_map = {}
  for n, shard in enumerate(shards):
    name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file({k: as_torch(tensors[k]) for k in shard}, str(folder / name), meta)
    weight_map.update({k: name for k in shard})
  total = sum(np.asarray(v).nbytes for v in tensors.values())
  (folder / SAFETENSORS_INDEX).write_text(
      json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


# Keys transformers renamed: an original's old spelling is dropped where ours has the new one,
# so that the two never disagree.
_RENAMED = {"torch_dtype": "dtype", "rope_scaling": "rope_parameters"}


def keep_original_fields(ours: Mapping, original: str | Mapping | None) -> dict:
  """An exported HF config dict with every field of the pretrained folder's config.json
  (`original`, its text or dict) that ours lacks; ours wins where both have a field, and nested
  configs (SAM's vision_config, ...) merge the same way."""
  if not original:
    return dict(ours)
  if isinstance(original, str):
    original = json.loads(original)
  out = json.loads(json.dumps(ours))  # keys as config.json has them (id2label's ints: text)
  for key, value in original.items():
    if key not in out:
      if _RENAMED.get(key) not in out:
        out[key] = value
    elif isinstance(out[key], Mapping) and isinstance(value, Mapping):
      out[key] = keep_original_fields(out[key], value)
  return out
