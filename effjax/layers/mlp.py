"""SwiGLU feed-forward block: wo(silu(x wg) * (x wu))."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from effjax.config import LinearConfig
from effjax.layers.linear import make_linear


class SwiGLU(nn.Module):
  d_ff: int
  linear: LinearConfig = LinearConfig()
  init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BLD):
    def proj(features, in_axis, out_axis, name):
      return make_linear(self.linear, features, group="mlp", in_axis=in_axis, out_axis=out_axis,
                         name=name, init_std=self.init_std, dtype=self.dtype,
                         param_dtype=self.param_dtype)

    gate_BLF = proj(self.d_ff, "embed", "mlp", "wi_gate")(x_BLD)
    up_BLF = proj(self.d_ff, "embed", "mlp", "wi_up")(x_BLD)
    h_BLF = nn.with_logical_constraint(nn.silu(gate_BLF) * up_BLF, ("batch", "length", "mlp"))
    return proj(x_BLD.shape[-1], "mlp", "embed", "wo")(h_BLF)
