"""Flash attention (Pallas, GPU and TPU) with a pure-jnp reference; see api.flash_attention."""
from pallas_kernels.attention.api import default_implementation
from pallas_kernels.attention.api import flash_attention
from pallas_kernels.attention.api import IMPLEMENTATIONS
from pallas_kernels.attention.common import BlockSizes
from pallas_kernels.attention.reference import attention_reference
from pallas_kernels.attention.work import count_work

__all__ = ["BlockSizes", "IMPLEMENTATIONS", "attention_reference", "count_work",
           "default_implementation", "flash_attention"]
