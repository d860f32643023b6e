"""The MoE FFN layer: router, FFN experts (stacked [E, ...]), MoE++ and shared experts, dispatch.

Params (logical axes in brackets):
  router     [D, R]      ("embed", None)            R = FFN + zero/copy/constant experts
  wi_gate    [E, D, F]   ("expert", "embed", "mlp") SwiGLU experts, one global array each, so a
  wi_up      [E, D, F]   ("expert", "embed", "mlp") checkpoint restores onto any expert-parallel
  wo         [E, F, D]   ("expert", "mlp", "embed") size
  residual   [R, R]      gating residual (MoE++): logits += previous layer's logits @ residual
  const_vectors [Nc, D], const_gates [Nc, D, 2]     MoE++ constant experts
  shared/...             a dense SwiGLU of width num_shared_experts * F (shared experts)
State: "moe_bias"/"selection_bias" [R] (sigmoid_bias router) and "moe_state"/"temperature"
(dense_to_sparse: the last training temperature, used by evaluation), updated in training only.
Sown: "aux_loss" (weighted load-balancing and z-loss), "metrics" (the dict at the end).

Padding (segment id 0) is routed nowhere: it takes no expert, capacity or compute and is left
out of every statistic, so adding padding changes no real token's output.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from effjax.config import ModelConfig
from effjax.layers.mlp import SwiGLU
from effjax.moe import dispatch as dispatch_lib
from effjax.moe import routers
from effjax.moe.experts import zero_computation_output
from effjax.moe.expert_parallel import expert_parallel_dispatch, expert_parallel_size

BIAS_COLLECTION = "moe_bias"
STATE_COLLECTION = "moe_state"


class MoELayer(nn.Module):
  config: ModelConfig
  train: bool = False

  def _state_var(self, collection, name, init):
    """The state variable, or None where it was not passed and cannot be created."""
    if self.has_variable(collection, name) or self.is_mutable_collection(collection):
      return self.variable(collection, name, init)
    return None

  @nn.compact
  def __call__(self, x_BLD, step=None, prev_logits_BLR=None, segment_ids_BL=None):
    """(y [B, L, D], router logits [B, L, R] float32). Tokens with segment id 0 are padding."""
    cfg, m = self.config, self.config.moe
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    b, l, d = x_BLD.shape
    t, r, e, f = b * l, m.num_routed, m.num_experts, cfg.moe_d_ff
    x_TD = x_BLD.reshape(t, d)
    token_mask_T = None if segment_ids_BL is None else segment_ids_BL.reshape(t) != 0
    num_groups = routers.group_count(t, m)  # refuses a group size that does not divide T

    def param(name, axes, shape, init=nn.initializers.normal(cfg.init_std)):
      return self.param(name, nn.with_logical_partitioning(init, axes), shape, param_dtype)

    router_DR = param("router", ("embed", None), (d, r))
    experts = {"wi_gate": param("wi_gate", ("expert", "embed", "mlp"), (e, d, f)),
               "wi_up": param("wi_up", ("expert", "embed", "mlp"), (e, d, f)),
               "wo": param("wo", ("expert", "mlp", "embed"), (e, f, d))}

    noise = self.train and self.has_rng("noise")
    router_in = x_TD.astype(jnp.float32)
    if m.jitter and noise:
      router_in = router_in * jax.random.uniform(self.make_rng("noise"), router_in.shape,
                                                 jnp.float32, 1 - m.jitter, 1 + m.jitter)
    logits_TR = router_in @ router_DR.astype(jnp.float32)
    if m.gating_residual:
      residual_RR = param("residual", (None, None), (r, r))
      if prev_logits_BLR is not None:
        logits_TR = logits_TR + prev_logits_BLR.reshape(t, r).astype(jnp.float32) @ \
            residual_RR.astype(jnp.float32)

    bias = None
    if m.router == "sigmoid_bias":
      bias = self._state_var(BIAS_COLLECTION, "selection_bias",
                             lambda: jnp.zeros((r,), jnp.float32))
      if bias is None:
        raise ValueError("the sigmoid_bias router needs its selection bias: pass the "
                         f"{BIAS_COLLECTION!r} collection created by init")
    mesh = jax.sharding.get_abstract_mesh()
    ep = expert_parallel_size(mesh)
    use_ep = m.dispatch == "dropless" and ep > 1
    if ep > 1 and e % ep:
      raise ValueError(f"model.moe.num_experts={e} is not divisible by the expert mesh axis "
                       f"({ep} devices)")
    gumbel_rng = self.make_rng("noise") if noise and m.router == "dense_to_sparse" else None
    tau = None
    if m.router == "dense_to_sparse":
      # training uses tau(step) and stores it; evaluation uses the stored (latest) value
      stored = self._state_var(STATE_COLLECTION, "temperature",
                           lambda: jnp.full((), m.temp_start, jnp.float32))
      tau = None if stored is None else stored.value
      if self.train:
        tau = routers.temperature(jnp.zeros((), jnp.int32) if step is None else step, m)
        if stored is not None and self.is_mutable_collection(STATE_COLLECTION) and \
            not self.is_initializing():
          stored.value = tau
    routing, extra = routers.route(logits_TR, m, train=self.train, temperature=tau,
                                   rng=gumbel_rng,
                                   bias_R=None if bias is None else bias.value,
                                   with_alternates=use_ep and m.ep_reroute,
                                   token_mask_T=token_mask_T)
    load_R = routers.expert_load(routing, r)
    if (bias is not None and self.train and self.is_mutable_collection(BIAS_COLLECTION)
        and not self.is_initializing()):
      bias.value = routers.bias_update(bias.value, load_R, m.bias_rate)

    ffn_valid = routing.valid & (routing.expert_idx < e)
    ffn_w = routing.weights * ffn_valid
    rerouted = jnp.zeros((), jnp.float32)
    slots_run = jnp.float32(routing.expert_idx.shape[1])  # slots per token the experts ran over
    factor = m.capacity_factor if self.train else m.resolved_eval_capacity_factor
    if m.dispatch == "capacity":
      group = t // num_groups
      cap = routers.capacity(group, m, factor)
      real_N = (jnp.full((num_groups,), group, jnp.int32) if token_mask_T is None else
                jnp.sum(token_mask_T.reshape(num_groups, group), axis=1))
      y_TD, dropped, computed = dispatch_lib.grouped_capacity_dispatch(
          x_TD, routing.expert_idx, ffn_valid, ffn_w, experts, num_groups=num_groups,
          capacity=cap, limit_N=routers.dynamic_capacity(real_N, m, factor, cap),
          dense_slots=routing.dense_slots, dtype=dtype)
    elif use_ep:
      y_TD, dropped, rerouted, computed = expert_parallel_dispatch(
          x_TD, routing.expert_idx, ffn_valid, ffn_w, routing.alt_idx, experts, mesh=mesh,
          factor=m.ep_buffer_factor, reroute=m.ep_reroute, impl=m.gmm_impl, dtype=dtype,
          alt_weights_TK=routing.alt_weights)
    elif routing.dense_slots and m.compact_experts_per_token:
      # the sparse phase pays for the experts it uses: when the tokens use at most
      # compact_experts_per_token experts on average, a grouped matmul over that many rows per
      # token holds every pair (exact); otherwise (the dense start) all E slots per token run
      rows = t * m.compact_experts_per_token
      fits = jnp.sum(ffn_valid) <= rows
      run = lambda max_rows: lambda x, valid, w: dispatch_lib.dropless_dispatch(
          x, routing.expert_idx, valid, w, experts, impl=m.gmm_impl, dtype=dtype,
          max_rows=max_rows)
      y_TD, dropped, computed = jax.lax.cond(fits, run(rows), run(None), x_TD, ffn_valid, ffn_w)
      slots_run = jnp.where(fits, jnp.float32(m.compact_experts_per_token), slots_run)
    else:
      y_TD, dropped, computed = dispatch_lib.dropless_dispatch(
          x_TD, routing.expert_idx, ffn_valid, ffn_w, experts, impl=m.gmm_impl, dtype=dtype)

    if m.num_copy_experts or m.num_constant_experts:
      vectors = gates = None
      if m.num_constant_experts:
        vectors = param("const_vectors", (None, "embed"), (m.num_constant_experts, d))
        gates = param("const_gates", (None, "embed", None), (m.num_constant_experts, d, 2))
      y_TD = y_TD + zero_computation_output(
          x_TD, routing.expert_idx, routing.weights * routing.valid, num_experts=e,
          num_zero=m.num_zero_experts, num_copy=m.num_copy_experts, constant_vectors=vectors,
          constant_gates=gates)
    y_BLD = y_TD.reshape(b, l, d).astype(dtype)
    if m.num_shared_experts:
      y_BLD = y_BLD + SwiGLU(m.num_shared_experts * f, cfg.linear, cfg.init_std, dtype,
                             param_dtype, name="shared")(x_BLD)

    balance = routers.load_balancing_loss(routing, load_R, routers.balance_weights(m))
    zl = routers.z_loss(logits_TR, token_mask_T)
    if m.aux_loss_weight:
      self.sow("aux_loss", "load_balance", m.aux_loss_weight * balance)
    if m.z_loss_weight:
      self.sow("aux_loss", "z_loss", m.z_loss_weight * zl)
    n_ffn = jnp.maximum(jnp.sum(ffn_valid).astype(jnp.float32), 1.0)
    n_real = (jnp.float32(t) if token_mask_T is None else
              jnp.maximum(jnp.sum(token_mask_T).astype(jnp.float32), 1.0))
    ffn_load = load_R[:e]
    metrics = {
        "expert_load": load_R,  # the router's assignments (what balancing sees)
        "computed_load": computed,  # [E] pairs each FFN expert ran: after drops and reroutes
        "dispatch_slots": slots_run,  # slots per token fed to the expert matmuls (cost)
        "load_max_over_mean": jnp.max(ffn_load) / jnp.maximum(jnp.mean(ffn_load), 1e-9),
        "dropped_fraction": dropped / n_ffn,
        "rerouted_fraction": rerouted / n_ffn,
        "router_entropy": routers.router_entropy(routing),
        "load_balance_loss": balance,
        "z_loss": zl,
        "experts_per_token": jnp.sum(routing.valid).astype(jnp.float32) / n_real,
        "ffn_experts_per_token": jnp.sum(computed) / n_real,  # what ran (FLOPs)
        "ffn_fraction": jnp.sum(ffn_valid).astype(jnp.float32) /
                        jnp.maximum(jnp.sum(routing.valid).astype(jnp.float32), 1.0),
        **extra}
    if m.dispatch == "capacity" or m.router == "expert_choice":
      metrics["capacity_factor"] = jnp.float32(factor)  # eval may differ only by opting in
    for name, value in metrics.items():
      self.sow("metrics", name, value)
    return y_BLD, logits_TR.reshape(b, l, r)
