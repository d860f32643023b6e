"""What the low-rank layers (LoRA, SST) share: the rank check and the frozen dense start.

Both begin from the dense layer's own init, W0 ~ normal(init_std) of shape [in, out]: LoRA
keeps it as its frozen base, SST takes its SVD.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


class FrozenBaseLinear(nn.Module):
  """The fields every low-rank projection has; subclasses add their own (with defaults)."""
  features: int
  rank: int
  in_axis: str
  out_axis: str
  init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32


def check_rank(rank, n_in: int, n_out: int, where: str) -> None:
  """ValueError unless 1 <= rank <= min(n_in, n_out)."""
  if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 1:
    raise ValueError(f"{where}: rank must be a positive integer, got {rank!r}")
  if rank > min(n_in, n_out):
    raise ValueError(f"{where}: rank={rank} is larger than min(in, out)=min({n_in}, {n_out}) "
                     f"= {min(n_in, n_out)}")


def checked_shape(module: FrozenBaseLinear, x, kind: str) -> tuple[int, int, str]:
  """(in, out, name for errors) of a low-rank layer applied to `x`, its rank checked."""
  n_in, n_out = x.shape[-1], module.features
  where = f"{kind} {'/'.join(module.scope.path) or module.name or ''}".rstrip()
  check_rank(module.rank, n_in, n_out, where)
  return n_in, n_out, where


def dense_init(module: FrozenBaseLinear, n_in: int, n_out: int, dtype):
  """The dense layer's init W0 [in, out] (normal(init_std)), drawn from the "params" stream."""
  return nn.initializers.normal(module.init_std)(module.make_rng("params"), (n_in, n_out), dtype)
