"""Expert parallelism over 4 and 8 simulated devices (tests/conftest.py sets 8) against one
device: forward and gradients, buffer overflow reporting and re-routing. Every step is
blocked (jax.block_until_ready): un-blocked collective loops can hang on 2 cores."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.config import MeshConfig, ModelConfig, MoEConfig
from effjax.moe import gmm as gmm_lib
from effjax.moe.layer import MoELayer
from effjax.parallel import build_mesh
from effjax.train import step as step_lib
from pallas_kernels.grouped_matmul import gmm as pallas_gmm

D, F = 8, 16


def _layer(**moe):
  cfg = ModelConfig(d_model=D, d_ff=F, num_heads=2, num_kv_heads=2, ffn="moe",
                    moe=MoEConfig(**moe))
  return MoELayer(cfg, train=True)


def _run(layer, params, x, mesh=None):
  """(loss, y, metrics), grads wrt (params, x): on `mesh` when given, else one device."""
  def loss(p, x):
    (y, _), sown = layer.apply({"params": p}, x, mutable=["metrics"])
    weights = jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))
    return jnp.sum(y * weights), (y, sown["metrics"])
  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  if mesh is None:
    return jax.block_until_ready(fn(params, x))
  with step_lib.sharding_context(mesh):
    return jax.block_until_ready(fn(params, x))


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.fixture(scope="module")
def setup():
  layer = _layer(num_experts=8, top_k=2)
  x = jax.random.normal(jax.random.key(1), (8, 4, D))
  params = nn.meta.unbox(jax.jit(layer.init)(jax.random.key(0), x)["params"])
  params["router"] = params["router"] * 40  # unequal loads: some devices receive more rows
  return layer, params, x, _run(layer, params, x)


@pytest.mark.parametrize("data, expert", [(1, 8), (2, 4)])  # 8 and 4 expert devices
def test_expert_parallel_equals_one_device_forward_and_gradients(setup, data, expert):
  layer, params, x, ((_, (y_ref, m_ref)), g_ref) = setup
  mesh = build_mesh(MeshConfig(data=data, expert=expert), jax.devices()[:data * expert])
  (_, (y, metrics)), grads = _run(layer, params, x, mesh)
  assert len(y.sharding.device_set) == data * expert  # really spread over the devices
  assert _rel(y, y_ref) < 1e-5
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(g_ref)):
    assert _rel(g, r) < 1e-5, path
  assert float(metrics["dropped_fraction"][0]) == 0  # worst-case buffer: nothing overflows
  np.testing.assert_array_equal(metrics["expert_load"][0], m_ref["expert_load"][0])


def test_buffer_overflow_is_counted_and_rerouting_reduces_it(setup):
  _, params, x, ((_, (y_ref, _)), _) = setup
  mesh = build_mesh(MeshConfig(data=1, expert=4), jax.devices()[:4])
  small = dict(num_experts=8, top_k=2, ep_buffer_factor=1.0)  # 1 x the balanced share
  (_, (y_drop, m_drop)), _ = _run(_layer(**small), params, x, mesh)
  (_, (y_re, m_re)), _ = _run(_layer(**small, ep_reroute=True), params, x, mesh)
  dropped = float(m_drop["dropped_fraction"][0])
  assert 0 < dropped < 1  # skewed routing overflows a balanced-size buffer: reported
  assert float(m_drop["rerouted_fraction"][0]) == 0
  rerouted = float(m_re["rerouted_fraction"][0])
  assert rerouted > 0
  np.testing.assert_allclose(float(m_re["dropped_fraction"][0]), dropped - rerouted, atol=1e-6)
  assert _rel(y_drop, y_ref) > 1e-3  # dropped pairs change the output (residual only)
  assert _rel(y_re, y_ref) > 1e-3


def test_expert_parallel_with_the_pallas_gmm_equals_one_device(setup, monkeypatch):
  # each device multiplies its local experts' rows with its local group sizes (no
  # group_offset); the GPU kernel runs in Pallas's interpreter on a CPU
  monkeypatch.setitem(gmm_lib.GMM_IMPLS, "pallas", functools.partial(pallas_gmm, interpret=True))
  _, params, x, ((_, (y_ref, _)), g_ref) = setup
  mesh = build_mesh(MeshConfig(data=1, expert=4), jax.devices()[:4])
  (_, (y, metrics)), grads = _run(_layer(num_experts=8, top_k=2, gmm_impl="pallas"), params, x,
                                  mesh)
  assert float(metrics["dropped_fraction"][0]) == 0
  assert _rel(y, y_ref) < 1e-5
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(g_ref)):
    assert _rel(g, r) < 1e-5, path


def _simulate_buffers(dest_of, alt_dest_of, ep, tokens_per_device, rows, reroute):
  """Hand simulation of one top-1 dispatch: per device, pairs in token order take a row of
  their destination's buffer; overflow then tries its alternate's leftover rows. Returns
  [T] status: 0 kept, 1 rerouted, 2 dropped."""
  status = []
  for _ in range(ep):
    room = [rows] * ep
    local = []
    for t in range(tokens_per_device):
      if room[dest_of[t]] > 0:
        room[dest_of[t]] -= 1
        local.append(0)
      else:
        local.append(2)
    if reroute:
      for t in range(tokens_per_device):
        if local[t] == 2 and room[alt_dest_of[t]] > 0:
          room[alt_dest_of[t]] -= 1
          local[t] = 1
    status += local
  return np.array(status)


@pytest.mark.slow
@pytest.mark.parametrize("factor", [1.0, 2.0])
@pytest.mark.parametrize("reroute", [False, True])
def test_adversarial_routing_drops_and_reroutes_as_a_hand_simulation(factor, reroute):
  """8 devices, 16 experts (2 per device), top-1: every token to expert 0 (device 0); its
  second choice is expert 1 (the same device, full too) or expert 2 (device 1, empty)."""
  from effjax.moe.expert_parallel import buffer_rows, expert_parallel_dispatch
  ep, e, t = 8, 16, 64
  mesh = build_mesh(MeshConfig(data=1, expert=ep), jax.devices()[:ep])
  keys = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(keys[0], (t, D))
  experts = {"wi_gate": jax.random.normal(keys[1], (e, D, F)),
             "wi_up": jax.random.normal(keys[2], (e, D, F)),
             "wo": jax.random.normal(keys[3], (e, F, D))}
  w = jax.random.uniform(keys[4], (t, 1), minval=0.2, maxval=1.0)
  alt_w = jax.random.uniform(keys[5], (t, 1), minval=0.2, maxval=1.0)
  idx, valid = jnp.zeros((t, 1), jnp.int32), jnp.ones((t, 1), bool)

  def run(x, w, alt_idx, alt_w):
    y, dropped, rerouted, computed = expert_parallel_dispatch(
        x, idx, valid, w, alt_idx, experts, mesh=mesh, factor=factor, reroute=reroute,
        impl="ragged_dot", dtype=jnp.float32, alt_weights_TK=alt_w)
    return jnp.sum(y), (y, dropped, rerouted, computed)
  step = jax.jit(jax.value_and_grad(run, argnums=(1, 3), has_aux=True))
  swiglu = lambda e_: (jax.nn.silu(x @ experts["wi_gate"][e_]) * (x @ experts["wi_up"][e_])
                       ) @ experts["wo"][e_]
  rows = buffer_rows(t // ep, ep, factor)
  assert rows == int(factor)  # 8 pairs per device, a balanced share of 1 (or 2) rows
  for alt in (1, 2):
    with step_lib.sharding_context(mesh):
      (_, (y, dropped, rerouted, computed)), (g_w, g_alt_w) = jax.block_until_ready(
          step(x, w, jnp.full((t, 1), alt, jnp.int32), alt_w))
    status = _simulate_buffers([0] * 8, [alt // 2] * 8, ep, t // ep, rows, reroute)
    kept, moved = status == 0, status == 1
    assert float(dropped) == np.sum(status == 2) and float(rerouted) == np.sum(moved)
    if reroute and alt == 2:
      assert np.sum(moved) == ep * rows > 0  # device 1's rows take the overflow
    else:
      assert np.sum(moved) == 0  # nowhere to go: the same device's buffer is full
    expected_load = np.zeros(e)
    expected_load[0], expected_load[alt] = np.sum(kept), np.sum(moved)
    np.testing.assert_array_equal(computed, expected_load)  # load where the work ran
    # kept pairs: their expert x their weight; rerouted: the alternate x ITS weight; else 0
    expected = (kept[:, None] * w * swiglu(0) + moved[:, None] * alt_w * swiglu(alt))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    # gradients: each pair's combine weight where its expert ran, nothing elsewhere
    assert np.all((np.asarray(g_w[:, 0]) != 0) == kept)
    assert np.all((np.asarray(g_alt_w[:, 0]) != 0) == moved)
