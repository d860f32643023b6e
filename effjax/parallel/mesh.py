"""Device meshes from per-axis degrees, and the one logical-axis rules table.

Every weight and block-boundary activation is annotated with logical names from a single
vocabulary; `LOGICAL_RULES` maps them onto the four mesh axes. Flax resolves rules in order and
uses each mesh axis at most once per array, so `batch` (listed first) claims `fsdp` for
activations while weights, which have no batch axis, shard their `embed` axis over `fsdp`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from effjax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical name -> mesh axis (or axes, or None = replicated)
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("expert", "expert"),
    ("blocks", "tensor"),  # Monarch block axis (both factors)
    ("embed", "fsdp"),
    # SST's bases and active columns ([n, k]) and Monarch's factors ([blocks, rows, cols]):
    # their second axis goes over fsdp too, so no such weight is whole on every chip (a mesh
    # axis is used once per array: a base whose first axis is `embed` keeps it there)
    ("spectral", "fsdp"),
    ("block_rows", "fsdp"),
    ("norm", None),
    ("layers", None),
    # KV cache [B, S, K, H] (effjax/layers/attention.py): rows like activations, kv heads over
    # the axis the attention projections' heads use
    ("cache_batch", ("data", "fsdp", "expert")),
    ("cache_length", None),
    ("cache_heads", "tensor"),
    ("cache_kv", None),
)


def resolve_degrees(config: MeshConfig, num_devices: int) -> dict[str, int]:
  """Fills the -1 axis and checks that the degrees multiply to the device count."""
  degrees = dataclasses.asdict(config)
  fixed = math.prod(d for d in degrees.values() if d != -1)
  fill = [name for name, d in degrees.items() if d == -1]
  if fill:
    if num_devices % fixed:
      raise ValueError(f"mesh degrees {degrees}: the fixed axes use {fixed} devices, which does "
                       f"not divide the {num_devices} available devices")
    degrees[fill[0]] = num_devices // fixed
  if math.prod(degrees.values()) != num_devices:
    raise ValueError(f"mesh degrees {degrees} multiply to {math.prod(degrees.values())}, but "
                     f"there are {num_devices} devices; make the product equal the device count "
                     "or set one axis to -1")
  return degrees


def build_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with axes (data, fsdp, tensor, expert), all Auto."""
  devices = list(jax.devices() if devices is None else devices)
  degrees = resolve_degrees(config, len(devices))
  shape = tuple(degrees[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
  """NamedSharding for an array whose dimensions carry these logical names."""
  spec = nn.logical_to_mesh_axes(tuple(logical_axes), LOGICAL_RULES)
  return NamedSharding(mesh, spec)


def mesh_spec(logical_axes: Sequence[str | None]) -> PartitionSpec:
  return nn.logical_to_mesh_axes(tuple(logical_axes), LOGICAL_RULES)


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways the global batch is split (the mesh axes `batch` maps to)."""
  spec = mesh_spec(("batch",))[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return math.prod(mesh.shape[a] for a in axes)


@contextlib.contextmanager
def sharding_context(mesh: Mesh):
  """Mesh and logical rules active while tracing, so logical constraints take effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield
