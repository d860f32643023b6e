"""The linear factory: every attention and MLP projection in the model is built here.

A projection is `[..., in] -> [..., features]`. Each call names its projection group (`qkv`,
`attn_out` or `mlp`); `LinearConfig.kind_for(group)` picks the layer kind, so a kind is
selectable per group from config without touching the model:

  dense    DenseLinear: one [in, features] weight `kernel` with logical names (in_axis, out_axis).
  monarch  MonarchLinear (effjax/layers/monarch.py): two block-diagonal factors `w1`, `w2`
           with `config.nblocks` blocks; the block axis is named "blocks". Uses the paper's
           uniform initialisation, not `init_std`. `config.monarch_impl`: XLA or the fused
           Pallas kernel.
  lora     LoRALinear (effjax/layers/lora.py): frozen W0 (model state "lora") + (alpha/r) A B.
  sst      SSTLinear (effjax/layers/spectral.py): U diag(sigma) V^T from the SVD of the dense
           init; sigma and r active columns trained, bases in model state "sst".
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from effjax.config import LinearConfig
from effjax.layers.lora import LoRALinear
from effjax.layers.monarch import MonarchLinear
from effjax.layers.spectral import SSTLinear


class DenseLinear(nn.Module):
  """y = x @ W, W of shape [in, features], computed in `dtype`."""
  features: int
  in_axis: str
  out_axis: str
  init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                        (self.in_axis, self.out_axis))
    kernel = self.param("kernel", init, (x.shape[-1], self.features), self.param_dtype)
    return jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.astype(self.dtype))


def make_linear(config: LinearConfig, features: int, *, group: str, in_axis: str,
                out_axis: str, name: str, init_std: float, dtype, param_dtype) -> nn.Module:
  """The projection module for projection group `group` (kinds validated in LinearConfig)."""
  kind = config.kind_for(group)
  if kind == "dense":
    return DenseLinear(features=features, in_axis=in_axis, out_axis=out_axis,
                       init_std=init_std, dtype=dtype, param_dtype=param_dtype, name=name)
  if kind == "monarch":
    return MonarchLinear(features=features, nblocks=config.nblocks, out_axis=out_axis,
                         dtype=dtype, param_dtype=param_dtype, impl=config.monarch_impl,
                         name=name)
  if kind == "lora":
    return LoRALinear(features=features, rank=config.rank, in_axis=in_axis, out_axis=out_axis,
                      alpha=config.lora_alpha, init_std=init_std, dtype=dtype,
                      param_dtype=param_dtype, name=name)
  if kind == "sst":
    return SSTLinear(features=features, rank=config.rank, in_axis=in_axis, out_axis=out_axis,
                     sampling=config.sst_sampling, init_std=init_std, dtype=dtype,
                     param_dtype=param_dtype, name=name)
  raise ValueError(f"model.linear: no layer of kind {kind!r} for group {group!r}")
