"""LoRA (Hu et al., 2021) for pre-training, and ReLoRA's merge (Lialin et al., 2023).

  y = x W0 + (alpha / r) (x A) B,  W0 [in, out] frozen, A [in, r], B [r, out]

W0 is the usual dense init (normal(init_std)), held in the model state collection "lora"
(never seen by the optimizer, checkpointed with the state); A starts uniform(+-1/sqrt(in))
(PyTorch's Kaiming-uniform default that LoRA uses), B starts at zero, so the function at init
is the dense layer's. Trainable: r (in + out) per layer.

ReLoRA (`relora_merge`, a pure function of one layer's params and state): W0 += (alpha/r) B A
folded in, A re-drawn, B zeroed, so the function is unchanged. The whole-state merge with its
optimizer-state reset is in effjax/train/methods/relora.py, the jagged learning-rate schedule
in effjax/optim/.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from effjax.layers.frozen_base import FrozenBaseLinear, checked_shape, dense_init

LORA_COLLECTION = "lora"
PARAM_NAMES = ("lora_a", "lora_b")


def lora_scale(alpha: float, rank: int) -> float:
  """alpha / r; alpha = 0 means alpha = r (scale 1)."""
  return 1.0 if not alpha else alpha / rank


def lora_param_count(n_in: int, n_out: int, rank: int) -> int:
  return rank * (n_in + n_out)


def _a_init(key, shape, dtype=jnp.float32):
  bound = 1.0 / math.sqrt(shape[-2])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoRALinear(FrozenBaseLinear):
  alpha: float = 0.0

  @nn.compact
  def __call__(self, x):
    n_in, n_out, _ = checked_shape(self, x, "LoRALinear")
    pd = self.param_dtype
    base_init = nn.with_logical_partitioning(lambda: dense_init(self, n_in, n_out, pd),
                                             (self.in_axis, self.out_axis))
    w0 = self.variable(LORA_COLLECTION, "w0", base_init).value
    a = self.param("lora_a", nn.with_logical_partitioning(_a_init, (self.in_axis, None)),
                   (n_in, self.rank), pd)
    b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros,
                                                           (None, self.out_axis)),
                   (self.rank, n_out), pd)
    dt = self.dtype
    x = x.astype(dt)
    y = jnp.einsum("...i,io->...o", x, w0.astype(dt))
    low = jnp.einsum("...i,ir->...r", x, a.astype(dt))
    return y + lora_scale(self.alpha, self.rank) * jnp.einsum("...r,ro->...o", low, b.astype(dt))


def lora_dense_weight(params, state, scale: float):
  return state["w0"] + scale * jnp.matmul(params["lora_a"], params["lora_b"],
                                          precision=jax.lax.Precision.HIGHEST)


def relora_merge(params, state, key, *, scale: float):
  """(params, state) after a ReLoRA restart: W0 <- W0 + scale A B, A re-drawn, B = 0.

  Extra leading axes (scanned layers) are allowed; every slice gets its own A."""
  a = params["lora_a"]
  w0 = state["w0"] + scale * jnp.matmul(a, params["lora_b"], precision=jax.lax.Precision.HIGHEST)
  new_a = _a_init(key, a.shape, a.dtype)
  return (dict(params, lora_a=new_a, lora_b=jnp.zeros_like(params["lora_b"])),
          dict(state, w0=w0.astype(state["w0"].dtype)))
