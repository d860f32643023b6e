"""The fully hyperbolic LM (HyboNet layers; effjax/models/hyperbolic_lm.py) and its low-rank
variants: --config=configs/hyperbolic.py:VARIANT[,METHOD].

VARIANT (size):
  tiny   the CPU default: d 64, 2 layers, sequences of 128 bytes, 600 steps (a few minutes
         on 2 cores; the Lorentz layers cost more per step than configs/lm.py:tiny's).
  test   a few-second model for the test suite.
METHOD (default full), as configs/sst.py sets it on the Euclidean LM, r = d_model / 8:
  full    every Lorentz linear W dense, AdamW
  lora    LoRA on every W: frozen random W0 + (alpha/r) B A
  relora  LoRA merged every 1/6 of the steps, re-warm-up (ReLoRA*, no full-rank warm start)
  galore  dense W, GaLore-Adam on every W (refresh every 1/6 of the steps, scale 0.25)
  sst     SST on every W, mixed sampling, new active set every 1/24 of the steps

The token embeddings (points of the hyperboloid) and the output biases stay dense. Examples:

  python -m experiments.train --config=configs/hyperbolic.py:tiny --workdir=runs/hyp_tiny
  python -m experiments.train --config=configs/hyperbolic.py:tiny,sst --workdir=runs/hyp_sst
"""
from configs import sst

VARIANTS = ("tiny", "test")


def get_config(arg: str = "tiny"):
  variant, _, method = arg.partition(",")
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/hyperbolic.py; choose one of "
                     f"{', '.join(VARIANTS)}")
  # the low-rank switches exactly as configs/sst.py sets them on the same base shape
  c = sst.get_config(f"{method or 'full'},{variant}")
  c.model.geometry = "hyperbolic"
  if variant == "tiny":
    c.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=256)
    c.data.seq_len = 128
  # the low-rank ranks were derived from the base's d_model: redo them for ours
  rank = max(1, c.model.d_model // 8)
  if c.model.linear.kind in ("lora", "sst"):
    c.model.linear.rank = rank
  if c.optim.galore_rank:
    c.optim.galore_rank = rank
  return c
