"""Parameter and FLOP accounting of MoE layers (total vs active per token)."""
from __future__ import annotations

from effjax.config import ModelConfig


def moe_layer_count(cfg: ModelConfig) -> int:
  return sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))


def moe_macs_delta(cfg: ModelConfig) -> int:
  """MACs per token to add to the all-dense-FFN count for cfg's MoE layers: minus the dense
  SwiGLU (3 D d_ff), plus the router (D R), the FFN experts that run (ffn_experts_per_token x
  3 D F: expert choice's cf x k), shared experts, the gating residual (R^2) and constant-expert
  gates (2 D Nc). Zero-computation experts are not free of work but have no matmul; with them
  the count is an upper bound."""
  n = moe_layer_count(cfg)
  if not n:
    return 0
  m, d = cfg.moe, cfg.d_model
  r, f = m.num_routed, cfg.moe_d_ff
  per_layer = (-3 * d * cfg.d_ff + d * r
               + (m.ffn_experts_per_token + m.num_shared_experts) * 3 * d * f
               + 2 * d * m.num_constant_experts + (r * r if m.gating_residual else 0))
  return round(n * per_layer)


def inactive_expert_params(cfg: ModelConfig) -> int:
  """FFN expert params a token does not use: (E - experts it runs) x 3 D F per MoE layer (on
  average for expert choice)."""
  m = cfg.moe
  return round(moe_layer_count(cfg) * (m.num_experts - m.ffn_experts_per_token) * 3 *
               cfg.d_model * cfg.moe_d_ff)
