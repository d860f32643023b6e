"""Grouped matmul for dropless MoE (Pallas: Mosaic GPU, Triton, Mosaic TPU); see api.gmm."""
from pallas_kernels.grouped_matmul.api import default_implementation
from pallas_kernels.grouped_matmul.api import gmm
from pallas_kernels.grouped_matmul.api import GPU_TILING
from pallas_kernels.grouped_matmul.api import IMPLEMENTATIONS
from pallas_kernels.grouped_matmul.api import MOSAIC_GPU_TILING
from pallas_kernels.grouped_matmul.api import tgmm
from pallas_kernels.grouped_matmul.api import TPU_TILING
from pallas_kernels.grouped_matmul.common import Tiles
from pallas_kernels.grouped_matmul.common import Tiling
from pallas_kernels.grouped_matmul.reference import gmm_reference
from pallas_kernels.grouped_matmul.reference import tgmm_reference

__all__ = ["GPU_TILING", "IMPLEMENTATIONS", "MOSAIC_GPU_TILING", "TPU_TILING", "Tiles", "Tiling",
           "default_implementation", "gmm", "gmm_reference", "tgmm", "tgmm_reference"]
