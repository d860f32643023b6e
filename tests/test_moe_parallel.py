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
