"""Meshes, logical-axis rules and sharding helpers."""
from effjax.parallel.mesh import (LOGICAL_RULES, MESH_AXES, build_mesh, data_parallel_size,
                                  logical_sharding, mesh_spec, resolve_degrees,
                                  sharding_context)
