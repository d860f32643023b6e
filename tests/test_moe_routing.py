"""MoE routing and accounting (issue 16): the task loss reaches every router, the activation
gate trains as it evaluates, padding is routed nowhere, expert choice counts what runs, MoE++'s
heterogeneous balance loss, GShard token groups, and EvoMoE's compacting sparse dispatch.
Expert-parallel rerouting is in tests/test_moe_parallel.py."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import moe as moe_configs
from effjax import config as config_lib
from effjax.config import ModelConfig, MoEConfig
from effjax.models.decoder_lm import flops_per_token
from effjax.moe import routers
from effjax.moe.dispatch import (capacity_dispatch, dropless_dispatch,
                                 grouped_capacity_dispatch)
from effjax.moe.layer import MoELayer

D, F = 8, 16
METRICS = ("expert_load", "computed_load", "dropped_fraction", "load_balance_loss", "z_loss",
           "router_entropy", "experts_per_token", "ffn_experts_per_token")


def _model(moe: MoEConfig):
  return ModelConfig(d_model=D, d_ff=F, num_heads=2, num_kv_heads=2, ffn="moe",
                     moe=dataclasses.replace(moe, d_ff=F))


def _init(layer, x, seed=0):
  """(params, other collections) of a fresh layer."""
  variables = nn.meta.unbox(jax.jit(layer.init)(jax.random.key(seed), x))
  state = {k: v for k, v in variables.items() if k in ("moe_bias", "moe_state")}
  return variables["params"], state


def _task_loss(y):
  return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape)))


# ------------------------------------------------------------- 1: the router's task gradient

def _router_grad_norm(cfg: MoEConfig, temperature=None):
  """|d task loss / d logits| through the router's combine weights alone (no aux losses)."""
  logits = 2 * jax.random.normal(jax.random.key(0), (32, cfg.num_routed))
  expert_out = jax.random.normal(jax.random.key(1), (32, cfg.num_routed))  # the experts' part

  def loss(logits):  # the combine: sum over a token's slots of weight x its expert's output
    r, _ = routers.route(logits, cfg, train=True, temperature=temperature,
                         bias_R=jnp.zeros((cfg.num_routed,)))
    return jnp.sum(r.weights * jnp.take_along_axis(expert_out, r.expert_idx, axis=-1))
  return float(jnp.linalg.norm(jax.jit(jax.grad(loss))(logits)))


@pytest.mark.parametrize("variant", moe_configs.VARIANTS)
def test_task_loss_alone_reaches_the_router_of_every_config_variant(variant):
  moe = config_lib.from_config_dict(moe_configs.get_config(f"{variant},test")).model.moe
  # dense_to_sparse: its dense start and its annealed end (hard top-1 where configured)
  temps = ((moe.temp_start, moe.temp_end) if moe.router == "dense_to_sparse" else (None,))
  for tau in temps:
    # a renormalised top-1 weight (p / p = 1) gives exactly 0 here
    assert _router_grad_norm(moe, tau) > 1e-3, (variant, tau)


ROUTER_CASES = {
    "softmax_topk_k1_raw": dict(router="softmax_topk", top_k=1, renormalize=False),
    "softmax_topk_k2_renormalised": dict(router="softmax_topk", top_k=2),
    "topk_softmax_k2": dict(router="topk_softmax", top_k=2),
    "sigmoid_bias_k1_raw": dict(router="sigmoid_bias", top_k=1, renormalize=False),
    "sigmoid_bias_k2_renormalised": dict(router="sigmoid_bias", top_k=2),
    "expert_choice": dict(router="expert_choice", allow_noncausal=True),
    "dense_to_sparse": dict(router="dense_to_sparse", threshold=0.05),
    "dense_to_sparse_hard": dict(router="dense_to_sparse", hard_gumbel=True, temp_start=0.5,
                                 temp_end=0.5),
    "dense_to_sparse_tanh": dict(router="dense_to_sparse", gate_activation="tanh"),
}


@pytest.mark.parametrize("case", list(ROUTER_CASES))
def test_task_loss_alone_reaches_every_router(case):
  assert _router_grad_norm(MoEConfig(num_experts=8, **ROUTER_CASES[case])) > 1e-3


def test_the_layer_passes_the_task_gradient_to_a_top1_router():
  """Through the whole layer (dispatch and combine) for Switch-style top-1."""
  layer = MoELayer(_model(MoEConfig(num_experts=4, top_k=1, renormalize=False,
                                    aux_loss_weight=0.0, z_loss_weight=0.0)), train=True)
  x = jax.random.normal(jax.random.key(1), (2, 8, D))
  params, _ = _init(layer, x)
  loss = lambda p: _task_loss(layer.apply({"params": p}, x, mutable=["metrics"])[0][0])
  grads = jax.jit(jax.grad(loss))(params)
  assert float(jnp.linalg.norm(grads["router"])) > 1e-3 * float(jnp.linalg.norm(grads["wo"]))


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_bias", "topk_softmax"])
def test_a_top1_weight_of_one_is_refused(router):
  with pytest.raises(ValueError, match=rf"router='{router}' with top_k=1.*no .*gradient"):
    MoEConfig(router=router, top_k=1, renormalize=True)


# ------------------------------------------------------------- 2: the activation gate in training

@pytest.mark.parametrize("activation, fn", [("tanh", jnp.tanh), ("sigmoid", jax.nn.sigmoid)])
def test_activation_gate_applies_the_activation_in_training(activation, fn):
  cfg = MoEConfig(num_experts=4, router="dense_to_sparse", gate_activation=activation,
                  threshold=0.05)
  logits = 4 * jax.random.normal(jax.random.key(0), (16, 4))
  key = jax.random.key(7)
  r, _ = routers.route(logits, cfg, train=True, temperature=0.5, rng=key)
  gate = jax.nn.softmax((fn(logits) + jax.random.gumbel(key, logits.shape)) / 0.5, axis=-1)
  best = jax.nn.one_hot(jnp.argmax(gate, -1), 4, dtype=bool)
  np.testing.assert_allclose(r.weights, gate * ((gate >= 0.05) | best), rtol=1e-6, atol=1e-7)
  raw = jax.nn.softmax((logits + jax.random.gumbel(key, logits.shape)) / 0.5, axis=-1)
  assert float(jnp.max(jnp.abs(r.weights - raw * (r.weights > 0)))) > 0.1  # not the raw logits


# ------------------------------------------------------------- 4: padding is routed nowhere

PADDING_CASES = {  # each also exercises a dispatch path / expert type
    "sigmoid_bias_capacity_drops": dict(num_experts=4, top_k=2, router="sigmoid_bias",
                                        dispatch="capacity", capacity_factor=0.75,
                                        bias_rate=0.1),
    "expert_choice": dict(num_experts=4, router="expert_choice", allow_noncausal=True),
    "dense_to_sparse_compact": dict(num_experts=4, router="dense_to_sparse", temp_start=0.2,
                                    temp_end=0.2, compact_experts_per_token=2),
    "moepp_dropless": dict(num_experts=4, top_k=2, num_zero_experts=1, num_copy_experts=1,
                           num_constant_experts=1),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(PADDING_CASES))
def test_adding_padding_changes_no_real_output_and_no_statistic(case):
  layer = MoELayer(_model(MoEConfig(**PADDING_CASES[case])), train=True)
  x = jax.random.normal(jax.random.key(1), (2, 6, D))
  params, state = _init(layer, x)
  params["router"] = params["router"] * 20
  # the same tokens, 3 padding positions appended to each row and one all-padding row
  x_pad = jnp.concatenate([x, 5 * jax.random.normal(jax.random.key(2), (2, 3, D))], axis=1)
  x_pad = jnp.concatenate([x_pad, 5 * jax.random.normal(jax.random.key(3), (1, 9, D))], axis=0)
  seg_pad = jnp.zeros((3, 9), jnp.int32).at[:2, :6].set(1)

  @jax.jit
  def both(params):
    run = lambda x, seg: layer.apply({"params": params, **state}, x, segment_ids_BL=seg,
                                     mutable=["metrics", "aux_loss", "moe_bias"])
    return run(x, jnp.ones((2, 6), jnp.int32)), run(x_pad, seg_pad)
  ((y, _), sown), ((y_pad, _), sown_pad) = both(params)
  np.testing.assert_allclose(y_pad[:2, :6], y, rtol=1e-5, atol=1e-6)
  for name in METRICS:
    np.testing.assert_allclose(sown_pad["metrics"][name][0], sown["metrics"][name][0],
                               rtol=1e-5, atol=1e-7, err_msg=name)
  if "moe_bias" in sown:  # the selection-bias update sees the same load
    np.testing.assert_array_equal(sown_pad["moe_bias"]["selection_bias"],
                                  sown["moe_bias"]["selection_bias"])
    assert float(jnp.max(jnp.abs(sown["moe_bias"]["selection_bias"]))) > 0
  if case.endswith("drops"):
    assert float(sown["metrics"]["dropped_fraction"][0]) > 0  # capacity binds: it is tested
  np.testing.assert_array_equal(sown_pad["metrics"]["computed_load"][0],
                                sown["metrics"]["computed_load"][0])


# ------------------------------------------------------------- 3: expert choice counts what runs

def test_expert_choice_counts_what_runs_and_evaluates_the_trained_mixture():
  moe = MoEConfig(num_experts=8, top_k=2, router="expert_choice", allow_noncausal=True)
  assert moe.ffn_experts_per_token == 2.5  # ceil(1.25 x T x 2 / 8) per expert
  x = jax.random.normal(jax.random.key(1), (4, 16, D))  # 64 tokens: C = 20 exactly
  opted = dataclasses.replace(moe, eval_capacity_factor=2.0)
  runs = {}
  for name, m, train in (("train", moe, True), ("eval", moe, False), ("eval_opted", opted, False)):
    layer = MoELayer(_model(m), train=train)
    params = jax.tree.map(jnp.zeros_like, nn.meta.unbox(jax.eval_shape(
        layer.init, jax.random.key(0), x)["params"]))
    params["router"] = jax.random.normal(jax.random.key(2), params["router"].shape)
    # zero experts: only the router decides the counts (and nothing else needs initialising)
    _, sown = jax.jit(lambda p: layer.apply({"params": p}, x, mutable=["metrics"]))(params)
    runs[name] = {k: float(jnp.sum(v[0])) for k, v in sown["metrics"].items()
                  if k in ("experts_per_token", "ffn_experts_per_token", "capacity_factor")}
  assert runs["train"] == {"experts_per_token": 2.5, "ffn_experts_per_token": 2.5,
                           "capacity_factor": 1.25}
  assert runs["eval"] == runs["train"]  # the mixture that was trained
  assert runs["eval_opted"] == {"experts_per_token": 4.0, "ffn_experts_per_token": 4.0,
                                "capacity_factor": 2.0}  # opt-in, and logged
  # FLOPs count 2.5 experts of 3 D F MACs per token, not top_k = 2
  cfg = dataclasses.replace(_model(moe), vocab_size=64, num_layers=1)
  top2 = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, router="softmax_topk",
                                                          allow_noncausal=False))
  delta = flops_per_token(cfg, 8)["forward"] - flops_per_token(top2, 8)["forward"]
  assert delta == 2 * 0.5 * 3 * D * F


# ------------------------------------------------------------- 5: MoE++ heterogeneous balance

def test_moepp_balance_loss_weights_zero_computation_experts_by_tau():
  cfg = MoEConfig(num_experts=4, top_k=2, num_zero_experts=1, num_copy_experts=1,
                  num_constant_experts=1, moepp_tau=0.5)
  logits = jax.random.normal(jax.random.key(0), (64, 7))
  r, _ = routers.route(logits, cfg, train=True)
  load = routers.expert_load(r, 7)
  f = np.asarray(load) / float(jnp.sum(load))
  p = np.asarray(jnp.mean(jax.nn.softmax(logits, -1), axis=0))
  eta = np.array([1, 1, 1, 1, 0.5, 0.5, 0.5])
  got = float(routers.load_balancing_loss(r, load, routers.balance_weights(cfg)))
  np.testing.assert_allclose(got, 7 * np.sum(eta * f * p), rtol=1e-5)
  assert f[4:].sum() > 0  # the zero-computation experts do receive tokens here
  switch = float(routers.load_balancing_loss(r, load, routers.balance_weights(
      dataclasses.replace(cfg, moepp_tau=1.0))))
  np.testing.assert_allclose(switch, 7 * np.sum(f * p), rtol=1e-5)
  np.testing.assert_array_equal(routers.balance_weights(MoEConfig(num_experts=4)), np.ones(4))


# ------------------------------------------------------------- 7: GShard token groups

def _experts(e, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return {"wi_gate": jax.random.normal(k[0], (e, D, F)),
          "wi_up": jax.random.normal(k[1], (e, D, F)), "wo": jax.random.normal(k[2], (e, F, D))}


def test_group_routing_drops_exactly_as_each_group_alone():
  t, e, k, groups = 64, 4, 2, 4
  x = jax.random.normal(jax.random.key(0), (t, D))
  logits = 3 * jax.random.normal(jax.random.key(1), (t, e))
  w, idx = jax.lax.top_k(jax.nn.softmax(logits, -1), k)
  idx = idx.astype(jnp.int32)
  valid = jnp.ones((t, k), bool)
  experts = _experts(e)
  cap = 5  # < 16 x 2 / 4 = 8: drops
  y, dropped, computed = jax.jit(functools.partial(
      grouped_capacity_dispatch, num_groups=groups, capacity=cap, dense_slots=False,
      dtype=jnp.float32))(x, idx, valid, w, experts)
  one = jax.jit(functools.partial(capacity_dispatch, capacity=cap, dense_slots=False,
                                  dtype=jnp.float32))
  parts = [one(x[s], idx[s], valid[s], w[s], experts)
           for s in (slice(i * 16, (i + 1) * 16) for i in range(groups))]
  np.testing.assert_allclose(y, jnp.concatenate([p[0] for p in parts]), rtol=1e-5, atol=1e-5)
  assert float(dropped) == sum(float(p[1]) for p in parts) > 0
  np.testing.assert_array_equal(computed, sum(p[2] for p in parts))
  assert float(jnp.max(computed)) <= groups * cap


@pytest.mark.slow
def test_group_routing_memory_is_linear_in_tokens():
  e, k = 8, 2

  def temp_bytes(t, groups):
    x = jax.ShapeDtypeStruct((t, D), jnp.float32)
    idx = jax.ShapeDtypeStruct((t, k), jnp.int32)
    valid = jax.ShapeDtypeStruct((t, k), jnp.bool_)
    w = jax.ShapeDtypeStruct((t, k), jnp.float32)
    experts = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _experts(e))
    cap = routers.capacity(t // groups, MoEConfig(num_experts=e, top_k=k), 1.25)
    fn = functools.partial(grouped_capacity_dispatch, num_groups=groups, capacity=cap,
                           dense_slots=False, dtype=jnp.float32)
    mem = jax.jit(fn).lower(x, idx, valid, w, experts).compile().memory_analysis()
    if mem is None:
      pytest.skip("no memory analysis on this backend")
    return mem.temp_size_in_bytes

  whole = temp_bytes(2048, 1) / temp_bytes(1024, 1)
  grouped = temp_bytes(2048, 8) / temp_bytes(1024, 4)  # groups of 256 tokens
  assert whole > 3.0  # [T, E, C] with C ~ T: quadratic
  assert grouped < 2.5  # linear


def test_group_size_that_does_not_divide_the_tokens_is_refused():
  layer = MoELayer(_model(MoEConfig(num_experts=4, dispatch="capacity", group_size=5)))
  with pytest.raises(ValueError, match=r"group_size=5 does not divide the 16 tokens"):
    jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros((2, 8, D)))


# ------------------------------------------------------------- 8: EvoMoE's sparse phase

@pytest.mark.slow
def test_dense_to_sparse_compact_dispatch_is_exact_and_runs_only_the_used_slots():
  """Step 0: hot (dense, every slot runs); step 1: annealed cold (sparse: 2 slots run)."""
  x = jax.random.normal(jax.random.key(1), (4, 8, D))
  out = {}
  for compact in (0, 2):
    moe = MoEConfig(num_experts=8, router="dense_to_sparse", temp_start=5.0, temp_end=0.05,
                    anneal_steps=1, threshold=0.05, compact_experts_per_token=compact)
    layer = MoELayer(_model(moe), train=True)
    params, _ = _init(layer, x)
    params["router"] = params["router"] * 20

    @jax.jit
    def run(p, step):
      def loss(p):
        (y, _), sown = layer.apply({"params": p}, x, step, mutable=["metrics", "moe_state"])
        return _task_loss(y), (y, sown["metrics"])
      return jax.value_and_grad(loss, has_aux=True)(p)
    for step in (0, 1):
      (_, (y, metrics)), grads = run(params, step)
      out[compact, step] = y, grads, {k: float(v[0]) for k, v in metrics.items()
                                      if k in ("dispatch_slots", "experts_per_token")}
  for step in (0, 1):
    (y_f, g_f, m_f), (y_c, g_c, _) = out[0, step], out[2, step]
    assert m_f["dispatch_slots"] == 8
    np.testing.assert_allclose(y_c, y_f, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_c), jax.tree.leaves(g_f)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  hot, cold = out[2, 0][2], out[2, 1][2]
  # a row budget too small for the pairs: the pairs past it are dropped and counted
  t, e = 32, 8
  valid = jnp.ones((t, e), bool).at[:, 3:].set(False)  # 3 experts per token, 96 pairs
  y, dropped, computed = jax.jit(functools.partial(
      dropless_dispatch, impl="ragged_dot", dtype=jnp.float32, max_rows=64))(
          x.reshape(t, D), jnp.broadcast_to(jnp.arange(e), (t, e)), valid,
          jnp.ones((t, e)), _experts(e))
  assert float(dropped) == 32 and float(jnp.sum(computed)) == 64
  np.testing.assert_array_equal(computed, [32, 32, 0, 0, 0, 0, 0, 0])  # expert 2's rows cut
  assert hot["experts_per_token"] > 2 and hot["dispatch_slots"] == 8  # dense: all slots
  assert cold["experts_per_token"] <= 2 and cold["dispatch_slots"] == 2  # the sparse phase


# ------------------------------------------------------------- 9: bench_moe's implementation flag

def test_bench_moe_times_the_dropless_rows_on_the_requested_gmm(monkeypatch):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from effjax.moe import gmm as gmm_lib  # pylint: disable=g-import-not-at-top
  from experiments import bench_moe  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["bench_moe"])
  calls = []
  for name in ("ragged_dot", "pallas"):
    impl = gmm_lib.GMM_IMPLS[name]
    monkeypatch.setitem(gmm_lib.GMM_IMPLS, name,
                        lambda *a, _n=name, _f=impl, **k: (calls.append(_n), _f(*a, **k))[1])
  tiny = dict(tokens=16, d_model=D, d_ff=F, reps=1)
  rows = [bench_moe.bench_case("dropless", "balanced", 4, 2, tiny, impl)
          for impl in ("pallas", "ragged_dot")]
  assert [r["gmm_impl"] for r in rows] == ["pallas", "ragged_dot"]
  assert set(calls) == {"pallas", "ragged_dot"} and calls[0] == "pallas"
