"""AdamW with linear warm-up and cosine decay: the optimizer of every full-rank run."""
from __future__ import annotations

import jax
import optax

from effjax.config import OptimConfig


def make_optimizer(config: OptimConfig, num_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warm-up then cosine decay; no weight decay on norms (1-D weights)."""
  adamw = optax.adamw(learning_rate_fn(config, num_steps), b1=config.b1, b2=config.b2,
                      eps=config.eps, weight_decay=config.weight_decay,
                      mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
  if config.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
  return adamw


def learning_rate_fn(config: OptimConfig, num_steps: int):
  """Linear warm-up from 0 to learning_rate, then cosine decay to learning_rate * min_lr_ratio."""
  return optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, config.warmup_steps, num_steps,
      config.learning_rate * config.min_lr_ratio)
