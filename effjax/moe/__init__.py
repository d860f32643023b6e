"""Mixture of Experts: routers, dispatch (capacity einsum, dropless sort + grouped matmul),
experts (SwiGLU FFN, zero/copy/constant), expert parallelism (shard_map), upcycling.

  routers.py          Routing, the five routers, load-balancing / z-loss, selection-bias update
  dispatch.py         capacity (oracle) and dropless dispatch; gather custom VJPs
  gmm.py              grouped_matmul(lhs, rhs, group_sizes, impl): the kernel seam
  expert_parallel.py  dropless dispatch inside jax.shard_map over the `expert` mesh axis
  experts.py          MoE++ zero, copy and constant experts
  layer.py            MoELayer, the FFN of an MoE block
  upcycle.py          dense params -> MoE params (sparse upcycling)
"""
from effjax.moe.gmm import GMM_IMPLS, grouped_matmul
from effjax.moe.layer import MoELayer
from effjax.moe.routers import Routing, route
from effjax.moe.upcycle import upcycle_params
