"""Monarch LM configs: --config=configs/monarch.py:VARIANT[,BASE] (BASE: a configs/lm.py variant,
default tiny).

  mlp       the SwiGLU weights Monarch, attention dense (the paper's GPT-2 setting)
  all       every attention and MLP projection Monarch
  reverse   `all` for the first 90% of the steps, then multiplied out to dense (reverse
            sparsification, train.dense_from_step)
  finetune  dense-to-sparse: project a dense run's weights onto `mlp` and fine-tune for 100
            steps; name the dense run with --config.train.init_from=WORKDIR

All use nblocks 4 (--config.model.linear.nblocks=N to change it). For example:

  python -m experiments.train --config=configs/monarch.py:finetune \\
      --config.train.init_from=runs/tiny --workdir=runs/tiny_to_monarch
"""
from configs import lm

VARIANTS = ("mlp", "all", "reverse", "finetune")


def get_config(arg: str = "mlp"):
  variant, _, base = arg.partition(",")
  c = lm.get_config(base or "tiny")
  c.model.linear.nblocks = 4
  steps = c.train.num_steps
  if variant == "mlp":
    c.model.linear.mlp = "monarch"
  elif variant in ("all", "reverse"):
    c.model.linear.kind = "monarch"
    if variant == "reverse":
      c.train.dense_from_step = steps - round(steps * 0.1)
  elif variant == "finetune":
    c.model.linear.mlp = "monarch"
    n = 100
    c.train.update(num_steps=n, eval_every=n // 2, checkpoint_every=n)
    c.optim.update(warmup_steps=n // 10, learning_rate=c.optim.learning_rate / 3)
  else:
    raise ValueError(f"unknown variant {variant!r} of configs/monarch.py; choose one of "
                     f"{', '.join(VARIANTS)}")
  return c
