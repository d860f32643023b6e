"""Token embedding (optionally reused as the output head) and rotary position embeddings."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class Embed(nn.Module):
  vocab_size: int
  features: int
  init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), ("vocab", "embed"))
    self.embedding = self.param("embedding", init, (self.vocab_size, self.features),
                                self.param_dtype)

  def __call__(self, ids_BL):
    return jnp.take(self.embedding, ids_BL, axis=0).astype(self.dtype)

  def attend(self, x_BLD):
    """Tied output head: logits against every embedding row, in float32."""
    return jnp.einsum("bld,vd->blv", x_BLD.astype(jnp.float32),
                      self.embedding.astype(jnp.float32))


def apply_rope(x_BLNH, positions_BL, theta: float):
  """Rotary embedding on the last axis (split-half convention), computed in float32."""
  head_dim = x_BLNH.shape[-1]
  half = head_dim // 2
  inv_freq_F = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BLF = positions_BL.astype(jnp.float32)[..., None] * inv_freq_F
  sin_BL1F = jnp.sin(angle_BLF)[:, :, None, :]
  cos_BL1F = jnp.cos(angle_BLF)[:, :, None, :]
  x = x_BLNH.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos_BL1F - x2 * sin_BL1F, x2 * cos_BL1F + x1 * sin_BL1F], axis=-1)
  return out.astype(x_BLNH.dtype)
