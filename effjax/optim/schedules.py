"""Learning-rate schedules as optax schedules (step -> learning rate)."""
from __future__ import annotations

import jax.numpy as jnp
import optax


def jagged_cosine(peak: float, warmup_steps: int, total_steps: int, min_ratio: float,
                  restart_every: int = 0, rewarm_steps: int = 0):
  """Linear warm-up then cosine to peak * min_ratio (the usual envelope), times a linear
  re-warm-up over `rewarm_steps` after every restart (ReLoRA's "jagged" schedule; SST's
  re-warm-up after a resample).

  Restarts happen after updates restart_every, 2 restart_every, ...; the update with step
  index s (s updates applied before it) uses lr(s), so the first update after a restart
  runs at envelope / rewarm_steps and the ramp reaches the envelope after `rewarm_steps`
  updates. Without restarts (either argument 0) this is the envelope itself.
  """
  envelope = optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, total_steps,
                                                peak * min_ratio)
  if not restart_every or not rewarm_steps:
    return envelope

  def schedule(step):
    step = jnp.asarray(step)
    since = step % restart_every
    ramp = jnp.minimum(1.0, (since + 1).astype(jnp.float32) / rewarm_steps)
    return envelope(step) * jnp.where(step >= restart_every, ramp, 1.0)

  return schedule
