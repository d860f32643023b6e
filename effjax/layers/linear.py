"""The linear factory: every attention and MLP projection in the model is built here.

A projection is `[..., in] -> [..., features]` with a 2-D weight and logical names
`(in_axis, out_axis)`. Later layer kinds (Monarch, SST, LoRA) register under a new
`LinearConfig.kind` and are then selectable from config without touching the model.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from effjax.config import LinearConfig


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


_KINDS = {"dense": DenseLinear}


def make_linear(config: LinearConfig, features: int, *, in_axis: str, out_axis: str, name: str,
                init_std: float, dtype, param_dtype) -> nn.Module:
  """The projection module of kind `config.kind` (validated in LinearConfig)."""
  cls = _KINDS[config.kind]
  return cls(features=features, in_axis=in_axis, out_axis=out_axis, init_std=init_std,
             dtype=dtype, param_dtype=param_dtype, name=name)
