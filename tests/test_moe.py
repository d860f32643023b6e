"""Mixture of Experts: routers, dispatch, zero-computation experts, upcycling, the LM.

Expert parallelism over simulated devices is in tests/test_moe_parallel.py.
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import lm as lm_configs
from configs import moe as moe_configs
from effjax import config as config_lib
from effjax.config import MeshConfig, ModelConfig, MoEConfig
from effjax.models.decoder_lm import DecoderLM, count_params, flops_per_token
from effjax.moe import gmm as gmm_lib
from effjax.moe import routers
from effjax.moe.accounting import inactive_expert_params
from effjax.moe.dispatch import capacity_dispatch, dropless_dispatch
from effjax.moe.experts import zero_computation_output
from effjax.moe.layer import MoELayer
from effjax.moe.upcycle import upcycle_params
from effjax.train import step as step_lib

D, F = 8, 16


def _layer(train=True, **moe):
  cfg = ModelConfig(d_model=D, d_ff=F, num_heads=2, num_kv_heads=2, ffn="moe",
                    moe=MoEConfig(**moe))
  return MoELayer(cfg, train=train)


def _x(b=4, l=4, seed=1):
  return jax.random.normal(jax.random.key(seed), (b, l, D))


def _params(layer, x, seed=0):
  return nn.meta.unbox(jax.jit(layer.init)(jax.random.key(seed), x)["params"])


def _value_and_grad(layer):
  """jitted (sum(y * fixed weights), y), d/d(params, x): exercises every backward path."""
  def loss(p, x):
    (y, _), _ = layer.apply({"params": p}, x, mutable=["metrics", "aux_loss"])
    return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))), y
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _max_rel(a, b):
  return max(float(jnp.linalg.norm(u - v) / (jnp.linalg.norm(v) + 1e-30))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ------------------------------------------------------------------------ dispatch

def test_dropless_equals_capacity_when_nothing_drops_and_runs_are_bitwise_equal():
  x = _x()
  dropless = _layer(num_experts=4, top_k=2, dispatch="dropless")
  capacity = _layer(num_experts=4, top_k=2, dispatch="capacity",
                    capacity_factor=2.0)  # C = 2 x 16 x 2 / 4 = all 16 tokens: nothing drops
  params = _params(dropless, x)
  params["router"] = params["router"] * 40  # unequal loads
  run_dropless = _value_and_grad(dropless)
  (_, y_ref), g_ref = run_dropless(params, x)
  (_, y_cap), g_cap = _value_and_grad(capacity)(params, x)
  assert float(jnp.linalg.norm(y_ref)) > 0
  assert _max_rel(y_cap, y_ref) < 1e-5
  assert _max_rel(g_cap, g_ref) < 1e-5
  assert float(jnp.linalg.norm(g_ref[0]["router"])) > 0  # the router learns through the combine
  # two runs agree bit for bit, gradients included
  (_, y2), g2 = run_dropless(params, x)
  for a, b in zip(jax.tree.leaves((y_ref, g_ref)), jax.tree.leaves((y2, g2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _use_interpreted_pallas_gmm(monkeypatch):
  """gmm_impl=pallas runs the Triton-style GPU kernel in Pallas's interpreter (16-wide tiles,
  so the small test shapes span several tiles), not the CPU's platform default (the jnp
  reference). Returns the list of rhs shapes it was traced with."""
  from pallas_kernels.grouped_matmul import Tiles, Tiling, gmm
  interpreted = functools.partial(gmm, implementation="gpu", interpret=True,
                                  tiling=Tiling(fwd=Tiles(16, 16, 16)))  # all 3 directions
  traced = []  # one entry per trace: proves the model really went through this seam

  def pallas(lhs, rhs, sizes, group_offset=None):
    traced.append(rhs.shape)
    return interpreted(lhs, rhs, sizes, group_offset=group_offset)
  monkeypatch.setitem(gmm_lib.GMM_IMPLS, "pallas", pallas)
  return traced


def test_pallas_gmm_dropless_equals_ragged_dot(monkeypatch):
  """gmm_impl=pallas through the seam, with the Triton-style kernel run in Pallas's
  interpreter (on CPU the platform default would be the jnp reference); one expert gets no
  token (a strongly biased router)."""
  _use_interpreted_pallas_gmm(monkeypatch)
  x = jnp.abs(_x())  # positive inputs, so a very negative router column means "never chosen"
  reference = _layer(num_experts=4, top_k=2, dispatch="dropless", gmm_impl="ragged_dot")
  pallas = _layer(num_experts=4, top_k=2, dispatch="dropless", gmm_impl="pallas")
  params = _params(reference, x)
  params["router"] = params["router"].at[:, 3].set(-1e3)
  _, sown = reference.apply({"params": params}, x, mutable=["metrics", "aux_loss"])
  assert float(sown["metrics"]["expert_load"][0][3]) == 0  # expert 3: an empty group
  (_, y_ref), g_ref = _value_and_grad(reference)(params, x)
  (_, y_pal), g_pal = _value_and_grad(pallas)(params, x)
  assert float(jnp.linalg.norm(y_ref)) > 0
  assert np.isfinite(np.asarray(y_pal)).all()
  assert _max_rel(y_pal, y_ref) < 1e-5
  assert _max_rel(g_pal, g_ref) < 1e-5


def test_capacity_dispatch_drops_overflow_in_slot_order_and_reports_it():
  # 6 tokens, all first choices on expert 0, second choices on expert 1; capacity 2
  t = 6
  x = jax.random.normal(jax.random.key(0), (t, D))
  idx = jnp.tile(jnp.array([[0, 1]], jnp.int32), (t, 1))
  valid = jnp.ones((t, 2), bool)
  w = jnp.full((t, 2), 0.5)
  experts = {k: jax.random.normal(jax.random.key(i), s) for i, (k, s) in enumerate(
      [("wi_gate", (2, D, F)), ("wi_up", (2, D, F)), ("wo", (2, F, D))])}
  y, dropped, computed = jax.jit(functools.partial(
      capacity_dispatch, capacity=2, dense_slots=False, dtype=jnp.float32))(x, idx, valid, w,
                                                                            experts)
  assert float(dropped) == 8  # 4 of 6 tokens per expert did not fit
  np.testing.assert_array_equal(computed, [2, 2])  # the load that ran: 2 per expert
  y_all, none, computed_all = jax.jit(functools.partial(
      dropless_dispatch, impl="ragged_dot", dtype=jnp.float32))(x, idx, valid, w, experts)
  assert float(none) == 0
  np.testing.assert_array_equal(computed_all, [6, 6])
  np.testing.assert_allclose(y[:2], y_all[:2], rtol=1e-5, atol=1e-6)  # tokens 0, 1 kept
  np.testing.assert_array_equal(np.asarray(y[2:]), 0)  # the rest pass only the residual


# ------------------------------------------------------------------------ routers

def _logits(t=64, r=8, seed=3, scale=2.0):
  return scale * jax.random.normal(jax.random.key(seed), (t, r))


def _route(logits, cfg, train=False, **kw):
  return jax.jit(functools.partial(routers.route, cfg=cfg, train=train, **kw))(logits)


def test_topk_routers_weights_and_ties():
  logits = _logits()
  softmax, _ = _route(logits, MoEConfig(top_k=2))
  mixtral, _ = _route(logits, MoEConfig(top_k=2, router="topk_softmax"))
  np.testing.assert_array_equal(softmax.expert_idx, mixtral.expert_idx)  # same top 2
  np.testing.assert_allclose(jnp.sum(softmax.weights, -1), 1.0, rtol=1e-6)
  # Mixtral: softmax over the two logits; renormalised softmax: the same ratio
  np.testing.assert_allclose(softmax.weights, mixtral.weights, rtol=1e-5)
  raw, _ = _route(logits, MoEConfig(top_k=2, renormalize=False))
  assert float(jnp.max(jnp.sum(raw.weights, -1))) < 1.0
  tied, _ = _route(jnp.zeros((3, 4)), MoEConfig(num_experts=4, top_k=2))
  np.testing.assert_array_equal(tied.expert_idx, [[0, 1]] * 3)  # ties: lower index, stable


def test_expert_choice_fills_every_expert_exactly_to_capacity():
  cfg = MoEConfig(num_experts=8, top_k=2, router="expert_choice", allow_noncausal=True,
                  capacity_factor=1.0)
  t = 64
  routing, _ = _route(_logits(t), cfg, train=True)
  c = routers.capacity(t, cfg, 1.0)
  assert c == 16
  load = routers.expert_load(routing, 8)
  np.testing.assert_array_equal(load, np.full(8, c))
  per_token = np.asarray(jnp.sum(routing.valid, -1))
  assert per_token.min() != per_token.max()  # a variable number of experts per token
  # the chosen tokens are each expert's highest-probability ones
  probs = np.asarray(routing.probs)
  for e in range(8):
    chosen = probs[np.asarray(routing.valid[:, e]), e]
    assert chosen.min() >= np.sort(probs[:, e])[-c]


def test_dense_to_sparse_gate_goes_from_uniform_dense_to_top1():
  x = _x()
  # (the hot gate through capacity dispatch, C = all tokens: its dense-slot path checked
  # against the mixture computed directly)
  hot = _layer(num_experts=4, router="dense_to_sparse", temp_start=1e4, temp_end=1e4,
               threshold=0.05, dispatch="capacity", capacity_factor=1.0)
  cold = _layer(num_experts=4, router="dense_to_sparse", temp_start=1e-3, temp_end=1e-3)
  top1 = _layer(num_experts=4, top_k=1, router="softmax_topk", renormalize=False)
  params = _params(hot, x)
  params["router"] = params["router"] * 10
  apply = lambda layer: jax.jit(lambda p, x: layer.apply(
      {"params": p}, x, mutable=["metrics"]))(params, x)
  (y_hot, _), m_hot = apply(hot)
  (y_cold, _), m_cold = apply(cold)
  (y_top1, _), _ = apply(top1)
  # uniform dense mixture: the mean over all experts of each expert's SwiGLU
  h = jnp.einsum("td,edf->etf", x.reshape(-1, D), params["wi_gate"])
  u = jnp.einsum("td,edf->etf", x.reshape(-1, D), params["wi_up"])
  mean = jnp.mean(jnp.einsum("etf,efd->etd", nn.silu(h) * u, params["wo"]), 0)
  assert m_hot["metrics"]["experts_per_token"][0] == 4.0
  assert _max_rel(y_hot.reshape(-1, D), mean) < 1e-3
  assert m_cold["metrics"]["experts_per_token"][0] == 1.0
  # the cold gate weights its expert by ~1; Switch top-1 by the raw probability p_max
  p_max = jnp.max(jax.nn.softmax(x @ params["router"], axis=-1), axis=-1, keepdims=True)
  assert _max_rel(y_cold, y_top1 / p_max) < 1e-5
  cfg = MoEConfig(router="dense_to_sparse", temp_start=2.0, temp_end=0.5, anneal_steps=10)
  taus = [float(routers.temperature(s, cfg)) for s in (0, 5, 10, 20)]
  np.testing.assert_allclose(taus, [2.0, 1.0, 0.5, 0.5], rtol=1e-6)  # exponential, then held


def test_hard_gumbel_gate_is_top1_with_straight_through_gradient_once_annealed():
  cfg = MoEConfig(num_experts=4, router="dense_to_sparse", temp_start=2.0, temp_end=0.5,
                  anneal_steps=10, anneal="linear", threshold=0.05, hard_gumbel=True)
  assert float(routers.temperature(10, cfg)) == np.float32(0.5)  # exactly temp_end: hard
  logits = jax.random.normal(jax.random.key(0), (6, 4))
  combine = jax.random.normal(jax.random.key(1), (6, 4))  # a fixed use of the weights

  def routed(logits, step):
    r, extra = routers.route(logits, cfg, train=True, temperature=routers.temperature(step, cfg))
    return jnp.sum(r.weights * combine), (r, extra)

  (_, (soft, extra_soft)), _ = jax.value_and_grad(routed, has_aux=True)(logits, 9)
  (_, (hard, extra)), grad = jax.value_and_grad(routed, has_aux=True)(logits, 10)
  assert float(extra_soft["hard_gate"]) == 0 and float(extra["hard_gate"]) == 1
  assert int(jnp.sum(soft.valid)) > 6  # one step before the end: still more than top-1
  best = jnp.argmax(logits, axis=-1)
  np.testing.assert_array_equal(hard.valid, jax.nn.one_hot(best, 4, dtype=bool))
  np.testing.assert_allclose(hard.weights, jax.nn.one_hot(best, 4), atol=1e-6)  # weight 1
  # the gradient is the soft gate's (straight-through), not zero
  gate = lambda l: jax.nn.softmax(l / 0.5, axis=-1)
  expected = jax.grad(lambda l: jnp.sum(jax.nn.one_hot(best, 4) * gate(l) * combine))(logits)
  assert float(jnp.linalg.norm(grad)) > 0
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_activation_gate_applies_the_activation_before_the_tempered_softmax():
  logits = 4 * jax.random.normal(jax.random.key(0), (6, 4))
  for activation, fn in (("tanh", jnp.tanh), ("sigmoid", jax.nn.sigmoid)):
    cfg = MoEConfig(num_experts=4, router="dense_to_sparse", gate_activation=activation,
                    threshold=0.05)
    r, _ = routers.route(logits, cfg, train=False, temperature=0.5)
    gate = jax.nn.softmax(fn(logits) / 0.5, axis=-1)
    np.testing.assert_allclose(r.weights, gate * (gate >= 0.05), rtol=1e-6)
    assert float(jnp.max(jnp.abs(r.weights - jax.nn.softmax(logits / 0.5, -1)))) > 0.1


def test_selection_bias_moves_a_skewed_router_toward_balance():
  layer = _layer(num_experts=4, top_k=1, router="sigmoid_bias", bias_rate=0.02,
                 aux_loss_weight=0.0, renormalize=False)
  x = _x(8, 8) + 0.5
  variables = nn.meta.unbox(jax.jit(layer.init)(jax.random.key(0), x))
  params = variables["params"]
  router = 0.3 * jax.random.normal(jax.random.key(5), params["router"].shape)
  params["router"] = router.at[:, 0].add(0.5)  # expert 0 wins for most tokens
  state = {"moe_bias": variables["moe_bias"]}

  @jax.jit
  def step(state):
    _, new = layer.apply({"params": params, **state}, x, mutable=["moe_bias", "metrics"])
    return {"moe_bias": new["moe_bias"]}, new["metrics"]["load_max_over_mean"][0]

  ratios = []
  for _ in range(20):
    state, ratio = step(state)
    ratios.append(float(ratio))
  assert ratios[0] > 2.5  # skewed: most of the 64 tokens on one of 4 experts
  assert np.mean(ratios[-5:]) < 0.5 * ratios[0]
  bias = state["moe_bias"]["selection_bias"]
  assert float(bias[0]) < 0 < float(jnp.max(bias[1:]))


# ------------------------------------------------------------------------ experts

def test_zero_copy_constant_experts_discard_identity_and_constant_mix():
  t = 5
  x = jax.random.normal(jax.random.key(0), (t, D))
  vectors = jax.random.normal(jax.random.key(1), (2, D))
  gates = jax.random.normal(jax.random.key(2), (2, D, 2))
  # E = 3 FFN experts, then zero (3), copy (4), constant (5, 6)
  fn = jax.jit(lambda idx, w: zero_computation_output(
      x, idx, w, num_experts=3, num_zero=1, num_copy=1, constant_vectors=vectors,
      constant_gates=gates))
  out = lambda idx, w: fn(jnp.asarray(idx, jnp.int32), jnp.asarray(w, jnp.float32))
  ones = np.ones((t, 1))
  np.testing.assert_array_equal(out(3 * ones, ones), 0)  # zero: discard
  np.testing.assert_array_equal(out(0 * ones, ones), 0)  # FFN slots are not computed here
  np.testing.assert_allclose(out(4 * ones, 0.3 * ones), 0.3 * x, rtol=1e-6)  # copy: identity
  a = jax.nn.softmax(x @ gates[1], axis=-1)  # constant 1: a0 x + a1 v
  np.testing.assert_allclose(out(6 * ones, ones), a[:, :1] * x + a[:, 1:] * vectors[1],
                             rtol=1e-5, atol=1e-6)
  # two slots add up: copy (0.25) + constant 0 (0.75)
  a0 = jax.nn.softmax(x @ gates[0], axis=-1)
  both = out(np.tile([[4, 5]], (t, 1)), np.tile([[0.25, 0.75]], (t, 1)))
  np.testing.assert_allclose(both, 0.25 * x + 0.75 * (a0[:, :1] * x + a0[:, 1:] * vectors[0]),
                             rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ config

@pytest.mark.parametrize("moe, mesh, message", [
    (dict(num_experts=6), dict(data=1, expert=4),
     r"num_experts=6 is not divisible by mesh.expert=4"),
    (dict(num_experts=4, top_k=5), {}, r"top_k=5 exceeds the 4 experts"),
    (dict(capacity_factor=0.0), {}, r"capacity_factor must be > 0, got 0.0"),
    (dict(eval_capacity_factor=-1.0), {}, r"eval_capacity_factor must be >= 0"),
    (dict(top_k=1), {}, r"router='softmax_topk' with top_k=1 and renormalize=True weights the "
                        r"chosen expert by p / p = 1.*renormalize=False"),
    (dict(top_k=1, router="sigmoid_bias"), {}, r"router='sigmoid_bias' with top_k=1"),
    (dict(top_k=1, router="topk_softmax", renormalize=False), {},
     r"router='topk_softmax' with top_k=1 always weights.*no gradient"),
    (dict(group_size=-4), {}, r"group_size must be an integer >= 0, got -4"),
    (dict(compact_experts_per_token=2), {}, r"compact_experts_per_token=2 belongs to the "
                                            r"dense_to_sparse router"),
    (dict(moepp_tau=-0.5), {}, r"moepp_tau must be >= 0, got -0.5"),
    (dict(router="hash"), {}, r"model.moe.router='hash' is not one of"),
    (dict(router="expert_choice"), {}, r"not causal.*allow_noncausal=True"),
    (dict(dispatch="ragged"), {}, r"model.moe.dispatch='ragged' is not one of"),
    (dict(gmm_impl="triton"), {}, r"model.moe.gmm_impl='triton' is not one of"),
    (dict(ep_reroute=True, num_experts=4, top_k=3), {}, r"ep_reroute needs 2 \* top_k"),
    (dict(hard_gumbel=True), {}, r"hard_gumbel=True belongs to the dense_to_sparse router, "
                                 r"not to router='softmax_topk'"),
    (dict(router="dense_to_sparse", gate_activation="relu"), {},
     r"model.moe.gate_activation='relu' is not one of"),
    (dict(upcycle_mask=1.0), {}, r"upcycle_mask must be in \[0, 1\), got 1.0"),
])
def test_bad_moe_config_fails_clearly(moe, mesh, message):
  c = lm_configs.get_config("tiny")
  c.model.ffn = "moe"
  c.model.moe.update(moe)
  c.mesh.update(mesh)
  with pytest.raises(ValueError, match=message):
    config_lib.from_config_dict(c)


def test_moe_layer_refuses_an_expert_axis_that_does_not_divide_the_experts():
  from effjax.parallel import build_mesh  # pylint: disable=g-import-not-at-top
  layer = _layer(num_experts=6, top_k=2)
  x = _x()
  mesh = build_mesh(MeshConfig(data=1, expert=4), jax.devices()[:4])
  with step_lib.sharding_context(mesh), pytest.raises(ValueError, match=r"num_experts=6 is "
                                                      r"not divisible by the expert mesh axis"):
    jax.eval_shape(lambda: layer.init(jax.random.key(0), x))


@pytest.mark.parametrize("variant", moe_configs.VARIANTS)
def test_moe_config_variants_are_valid(variant):
  cfg = config_lib.from_config_dict(moe_configs.get_config(f"{variant},test"))
  assert cfg.model.ffn == "moe"


def test_gmm_impl_pallas_is_valid_and_every_config_name_is_registered():
  c = moe_configs.get_config("top2,test")
  c.model.moe.gmm_impl = "pallas"
  assert config_lib.from_config_dict(c).model.moe.gmm_impl == "pallas"
  assert set(config_lib.MOE_GMM_IMPLS) == set(gmm_lib.GMM_IMPLS)


# ------------------------------------------------------------------------ the LM

LM = dict(vocab_size=384, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2, d_ff=32)


def _lm_cfg(**moe):
  return ModelConfig(**LM, ffn="moe", moe=MoEConfig(**moe))


def test_upcycled_moe_computes_the_dense_function_at_step_0():
  dense_cfg = dataclasses.replace(_lm_cfg(), ffn="dense")
  moe_cfg = _lm_cfg(num_experts=4, top_k=2, d_ff=32)
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 256)
  dense_params = nn.meta.unbox(jax.jit(DecoderLM(dense_cfg).init)(jax.random.key(1),
                                                                  tokens)["params"])
  # the fresh MoE params: only their router's values matter (the rest is replaced)
  moe_params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.meta.unbox(
      jax.eval_shape(DecoderLM(moe_cfg).init, jax.random.key(2), tokens)["params"]))
  router = moe_params["layers_0"]["mlp"]["router"]
  moe_params["layers_0"]["mlp"]["router"] = jax.random.normal(jax.random.key(4), router.shape)
  up = upcycle_params(dense_params, moe_params)
  np.testing.assert_array_equal(up["layers_0"]["mlp"]["wo"][3],
                                dense_params["layers_0"]["mlp"]["wo"]["kernel"])
  np.testing.assert_array_equal(up["layers_0"]["mlp"]["router"],
                                moe_params["layers_0"]["mlp"]["router"])  # fresh router kept
  dense_logits = jax.jit(DecoderLM(dense_cfg).apply)({"params": dense_params}, tokens)
  moe_apply = jax.jit(DecoderLM(moe_cfg).apply)
  np.testing.assert_allclose(moe_apply({"params": up}, tokens), dense_logits, rtol=1e-5,
                             atol=1e-5)
  noisy = upcycle_params(dense_params, moe_params, jax.random.key(3), noise=0.01)
  experts = noisy["layers_0"]["mlp"]["wi_gate"]
  assert float(jnp.max(jnp.abs(experts[0] - experts[1]))) > 0  # symmetry broken
  assert _max_rel(moe_apply({"params": noisy}, tokens), dense_logits) < 0.05
  with pytest.raises(ValueError, match=r"layers_0/mlp: the MoE layer has no dense SwiGLU"):
    upcycle_params(moe_params, moe_params)
  # EvoMoE's expert-diversify: each copy keeps a random ~75% of the dense weights, unscaled
  masked = upcycle_params(dense_params, moe_params, jax.random.key(5), mask=0.25)
  for name in ("wi_gate", "wi_up", "wo"):
    experts, dense_w = masked["layers_0"]["mlp"][name], dense_params["layers_0"]["mlp"][name]
    kept = experts != 0
    np.testing.assert_array_equal(jnp.where(kept, dense_w["kernel"][None], 0), experts)
    assert 0.2 < 1 - float(jnp.mean(kept)) < 0.3
    assert bool(jnp.any(kept[0] != kept[1]))  # a different mask per expert
  with pytest.raises(ValueError, match=r"mask=0.25 need an rng"):
    upcycle_params(dense_params, moe_params, mask=0.25)


def test_lm_counts_total_and_active_params_and_flops():
  cfg = _lm_cfg(num_experts=4, top_k=2, d_ff=16)
  dense = dataclasses.replace(cfg, ffn="dense")
  shapes = jax.eval_shape(DecoderLM(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  n = count_params(shapes["params"])
  n_dense = count_params(jax.eval_shape(DecoderLM(dense).init, jax.random.key(0),
                                        jnp.zeros((1, 4), jnp.int32))["params"])
  d, f, e = 16, 16, 4
  assert n - n_dense == e * 3 * d * f + d * e - 3 * d * 32  # experts + router - dense FFN
  assert n - inactive_expert_params(cfg) == n_dense + d * e  # 2 x 16 wide = the dense 32
  delta = flops_per_token(cfg, 8)["forward"] - flops_per_token(dense, 8)["forward"]
  assert delta == 2 * d * e  # equal active FFN MACs; only the router is extra


# one parametrized smoke test: each router, dispatch and expert type trains the LM
# (the routers, both dispatch modes and every expert type spread over four compilations)
# (Mixtral's top-k-then-softmax differs from softmax_topk only in the weights: see
# test_topk_routers_weights_and_ties)
TRAIN_CASES = {  # the top-2 case runs its expert matmuls on the (interpreted) Pallas gmm
    "top2_dropless_pallas_moepp_shared": dict(router="softmax_topk", gmm_impl="pallas",
                                              num_zero_experts=1,
                                       num_copy_experts=1, num_constant_experts=1,
                                       gating_residual=True, num_shared_experts=1),
    "sigmoid_bias_capacity": dict(router="sigmoid_bias", aux_loss_weight=0.0, bias_rate=0.01,
                                  dispatch="capacity"),
    "expert_choice_dropless": dict(router="expert_choice", allow_noncausal=True, jitter=0.1),
    "dense_to_sparse_dropless": dict(router="dense_to_sparse", anneal_steps=2),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_lm_trains_with_each_router_dispatch_and_expert_type(case, monkeypatch):
  pallas_traces = _use_interpreted_pallas_gmm(monkeypatch)
  moe = dict(num_experts=4, top_k=2, d_ff=16, **TRAIN_CASES[case])
  cfg = dataclasses.replace(_lm_cfg(**moe), num_layers=2 if moe.get("gating_residual") else 1)
  model = DecoderLM(cfg)
  tx = optax.adam(1e-2)

  @jax.jit
  def init(key):  # one compilation (eager tx.init would compile op by op)
    variables = nn.meta.unbox(model.init(key, jnp.zeros((1, 8), jnp.int32)))
    params, model_state = step_lib.split_variables(variables)
    return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params), rng=jax.random.key_data(key),
                               model_state=model_state)

  state = init(jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(2), (4, 9), 0, 256)
  batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens),
           "positions": jnp.broadcast_to(jnp.arange(9), tokens.shape)}
  train_step = jax.jit(step_lib.make_train_step(model, tx, lambda s: 1e-2))
  losses = []
  for _ in range(3):
    state, metrics = jax.block_until_ready(train_step(state, batch))
    losses.append(float(metrics["train_loss"]))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  m = cfg.moe
  # the three expert matmuls (gate, up: [E, D, F]; down: [E, F, D]) ran on the Pallas kernel
  assert bool(pallas_traces) == (m.gmm_impl == "pallas")
  assert set(pallas_traces) <= {(4, cfg.d_model, 16), (4, 16, cfg.d_model)}
  load = np.asarray(metrics["layers_0/mlp/expert_load"])
  assert load.shape == (m.num_routed,)
  tokens_per_step = 4 * 8
  if m.router == "expert_choice":
    np.testing.assert_array_equal(load, routers.capacity(tokens_per_step, m, 1.25))
  elif m.router == "dense_to_sparse":
    assert tokens_per_step <= load.sum() <= tokens_per_step * m.num_experts
    tau = float(metrics["layers_0/mlp/temperature"])
    assert tau < m.temp_start
    # evaluation uses the temperature training reached, stored with the model state
    assert float(state.model_state["moe_state"]["layers_0"]["mlp"]["temperature"]) == tau
  else:
    assert load.sum() == tokens_per_step * m.top_k
  for key, low, high in [("dropped_fraction", 0, 1), ("router_entropy", 0, np.log(m.num_routed)),
                         ("load_max_over_mean", 1, m.num_routed), ("z_loss", 0, np.inf),
                         ("load_balance_loss", 0, m.num_routed), ("ffn_fraction", 0, 1)]:
    value = float(metrics[f"layers_0/mlp/{key}"])
    assert low <= value <= high + 1e-5, (key, value)
  if m.aux_loss_weight or m.z_loss_weight:
    assert float(metrics["aux_loss"]) > 0
  if m.dispatch == "capacity":
    assert float(metrics["layers_0/mlp/dropped_fraction"]) < 1
  if m.router == "sigmoid_bias":
    assert float(jnp.max(jnp.abs(state.model_state["moe_bias"]["layers_0"]["mlp"][
        "selection_bias"]))) > 0
  if m.num_zero_experts:
    assert float(jnp.linalg.norm(state.params["layers_1"]["mlp"]["residual"])) > 0
