"""Fused Monarch layer (Pallas: Mosaic TPU and Mosaic GPU) with a pure-jnp reference; see
api.monarch."""
from pallas_kernels.monarch.api import default_implementation
from pallas_kernels.monarch.api import IMPLEMENTATIONS
from pallas_kernels.monarch.api import monarch
from pallas_kernels.monarch.common import Blocks
from pallas_kernels.monarch.reference import monarch_reference

__all__ = ["Blocks", "IMPLEMENTATIONS", "default_implementation", "monarch", "monarch_reference"]
