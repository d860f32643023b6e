"""Mixture-of-Experts LM configs: --config=configs/moe.py:VARIANT[,BASE] (BASE: a configs/lm.py
variant, default tiny). Every layer's FFN is MoE (model.moe.every_n=1; 2 would make every
second layer MoE).

Routed experts have width d_ff / 2, so top-2 routing uses as many FFN parameters per token as
the dense base ("equal active parameters"):

  top2           8 experts, softmax then top-2 (renormalised), dropless (sort + ragged_dot)
  capacity       top2 with GShard capacity dispatch (capacity factor 1.25 train / 2.0 eval,
                 opted into: fewer evaluation drops); model.moe.group_size=N routes within
                 groups of N tokens (memory linear in the batch)
  mixtral        8 experts, top-2 on the logits then softmax over the two
  sigmoid_bias   8 experts, sigmoid scores, aux-loss-free selection bias (rate 1e-3), no aux loss
  expert_choice  8 experts, each takes its top-C tokens (C = 1.25 x T x 2 / 8), so a token
                 gets 2.5 experts on average (counted so in FLOPs), in evaluation too (same
                 capacity factor); NOT causal (allow_noncausal=True is set: a training-only
                 study)
  evomoe         8 experts, EvoMoE dense-to-sparse Gumbel gate, temperature 2.0 -> 0.3 over
                 the run, threshold 0.05 (a variable number of experts per token); once
                 tokens use at most 2 experts on average, the expert matmuls run over 2 rows
                 per token instead of 8
  moepp          MoE++: 8 FFN + 1 zero + 1 copy + 2 constant experts, top-2, gating residuals,
                 heterogeneous load balance (zero-computation experts' terms x tau = 0.75)
  shared         1 shared expert + top-1 of 8 routed experts, weighted by the raw softmax
                 probability (Switch / DeepSeekMoE; renormalising one weight would make it 1)
  upcycle        top2 with full-width experts (d_ff), initialised from a dense run of BASE:
                 --config.train.init_from=WORKDIR; 300 steps at a third of the learning rate
  evomoe_diversify  EvoMoE's two phases, the dense run of BASE being its single expert:
                 upcycle's set-up, but each copy has a random 25% of its weights zeroed
                 (expert-diversify; the ratio is our choice) and the gate is dense-to-sparse,
                 annealed over the first two thirds of the steps, hard top-1 Gumbel after

For example:

  python -m experiments.train --config=configs/moe.py:top2 --workdir=runs/moe_top2
  python -m experiments.train --config=configs/moe.py:upcycle \\
      --config.train.init_from=runs/tiny --workdir=runs/tiny_upcycled
"""
from configs import lm

VARIANTS = ("top2", "capacity", "mixtral", "sigmoid_bias", "expert_choice", "evomoe", "moepp",
            "shared", "upcycle", "evomoe_diversify")


def get_config(arg: str = "top2"):
  variant, _, base = arg.partition(",")
  c = lm.get_config(base or "tiny")
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/moe.py; choose one of "
                     f"{', '.join(VARIANTS)}")
  c.model.ffn = "moe"
  m = c.model.moe
  m.update(num_experts=8, top_k=2, d_ff=c.model.d_ff // 2, router="softmax_topk",
           dispatch="dropless")
  if variant == "capacity":
    m.update(dispatch="capacity", eval_capacity_factor=2.0)
  elif variant == "mixtral":
    m.router = "topk_softmax"
  elif variant == "sigmoid_bias":
    m.update(router="sigmoid_bias", aux_loss_weight=0.0, bias_rate=1e-3)
  elif variant == "expert_choice":
    m.update(router="expert_choice", allow_noncausal=True)
  elif variant == "evomoe":
    m.update(router="dense_to_sparse", temp_start=2.0, temp_end=0.3,
             anneal_steps=c.train.num_steps, threshold=0.05, compact_experts_per_token=2)
  elif variant == "moepp":
    m.update(num_zero_experts=1, num_copy_experts=1, num_constant_experts=2,
             gating_residual=True)
  elif variant == "shared":
    m.update(top_k=1, num_shared_experts=1, renormalize=False)
  elif variant in ("upcycle", "evomoe_diversify"):
    m.d_ff = c.model.d_ff
    n = 300 if c.train.num_steps >= 300 else c.train.num_steps
    c.train.update(num_steps=n, eval_every=max(n // 3, 1), checkpoint_every=n)
    c.optim.update(warmup_steps=max(n // 10, 1), learning_rate=c.optim.learning_rate / 3)
    if variant == "upcycle":
      m.upcycle_noise = 0.01
    else:
      m.update(upcycle_mask=0.25, router="dense_to_sparse", temp_start=2.0, temp_end=0.3,
               anneal_steps=max(2 * n // 3, 1), threshold=0.05, hard_gumbel=True,
               compact_experts_per_token=2)
  return c
