"""Sparse Spectral Training and its low-rank baselines: --config=configs/sst.py:VARIANT[,BASE]
(BASE: a configs/lm.py variant, default tiny).

  full     every projection dense, AdamW (the reference)
  lora     LoRA on every attention and MLP projection: frozen random W0 + (alpha/r) B A
  relora   LoRA merged into W0 every 1/6 of the steps, A/B re-drawn, their Adam state reset,
           learning rate re-warmed (jagged cosine); no full-rank warm start (the SST paper's
           ReLoRA*)
  galore   dense weights, GaLore-Adam on every attention/MLP kernel (refresh every 1/6 of the
           steps, scale 0.25)
  sst      SST on every attention and MLP projection, mixed sampling, a new active set every
           1/24 of the steps with an Adam reset and re-warm-up, re-SVD every round

Embeddings and the output head stay dense everywhere. Rank: r = d_model / 8 for all methods
(--config.model.linear.rank=R for lora/relora/sst, --config.optim.galore_rank=R for galore).
For example:

  python -m experiments.train --config=configs/sst.py:sst --workdir=runs/sst_tiny
"""
from configs import lm

VARIANTS = ("full", "lora", "relora", "galore", "sst")


def get_config(arg: str = "sst"):
  variant, _, base = arg.partition(",")
  c = lm.get_config(base or "tiny")
  steps = c.train.num_steps
  rank = max(1, c.model.d_model // 8)
  rewarm = max(1, steps // 60)
  if variant == "full":
    pass
  elif variant in ("lora", "relora"):
    c.model.linear.update(kind="lora", rank=rank)
    if variant == "relora":
      c.model.linear.relora_every = max(1, steps // 6)
      c.optim.rewarm_steps = rewarm
  elif variant == "galore":
    c.optim.update(galore_rank=rank, galore_every=max(1, steps // 6), galore_scale=0.25)
  elif variant == "sst":
    c.model.linear.update(kind="sst", rank=rank, sst_every=max(1, steps // 24),
                          sst_sampling="mixed")
    c.optim.rewarm_steps = min(rewarm, max(1, steps // 24))
  else:
    raise ValueError(f"unknown variant {variant!r} of configs/sst.py; choose one of "
                     f"{', '.join(VARIANTS)}")
  return c
