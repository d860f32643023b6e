"""The low-rank baselines: LoRA, ReLoRA (merge, optimizer reset/pruning, jagged schedule) and
GaLore (projection side, refresh, moments, full rank = Adam). The teacher-student check of all
methods is in tests/test_sst.py."""
import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effjax.layers.linear import DenseLinear
from effjax.layers.lora import LoRALinear, lora_dense_weight, relora_merge
from effjax.optim import lowrank
from effjax.optim.galore import scale_by_galore
from effjax.optim.schedules import jagged_cosine
from effjax.train.methods import relora
from effjax.train.step import TrainState, split_variables


def _lora(n_in=16, n_out=24, rank=4, alpha=8.0, seed=0):
  layer = LoRALinear(n_out, rank, "embed", "mlp", alpha=alpha)
  variables = nn.meta.unbox(jax.jit(layer.init)(jax.random.key(seed), jnp.zeros((1, n_in))))
  params, state = split_variables(variables)
  return layer, params, state


def test_lora_starts_as_its_frozen_dense_base_with_r_m_plus_n_trainable():
  layer, params, state = _lora()
  assert set(params) == {"lora_a", "lora_b"} and set(state["lora"]) == {"w0"}
  assert sum(p.size for p in jax.tree.leaves(params)) == 4 * (16 + 24)
  assert not bool(jnp.any(params["lora_b"] != 0)) and bool(jnp.any(params["lora_a"] != 0))
  x = jax.random.normal(jax.random.key(1), (3, 16))
  np.testing.assert_allclose(layer.apply({"params": params, **state}, x),
                             x @ state["lora"]["w0"], rtol=1e-6, atol=1e-7)
  # the same init key gives the dense layer's weight as W0
  dense = jax.eval_shape(DenseLinear(24, "embed", "mlp").init, jax.random.key(0),
                         jnp.zeros((1, 16)))
  assert dense["params"]["kernel"].unbox().shape == state["lora"]["w0"].shape


def test_relora_merge_keeps_the_function_and_restarts_a_and_b():
  layer, params, state = _lora()
  params = dict(params, lora_b=jax.random.normal(jax.random.key(2), params["lora_b"].shape))
  x = jax.random.normal(jax.random.key(1), (5, 16))
  before = layer.apply({"params": params, **state}, x)
  scale = 8.0 / 4
  new_params, new_lora = jax.jit(lambda p, s, k: relora_merge(p, s, k, scale=scale))(
      params, state["lora"], jax.random.key(7))
  after = layer.apply({"params": new_params, "lora": new_lora}, x)
  assert float(jnp.linalg.norm(after - before) / jnp.linalg.norm(before)) < 1e-5
  assert not bool(jnp.any(new_params["lora_b"] != 0))
  assert not np.allclose(new_params["lora_a"], params["lora_a"])
  np.testing.assert_allclose(lora_dense_weight(new_params, new_lora, scale),
                             lora_dense_weight(params, state["lora"], scale), rtol=1e-5,
                             atol=1e-6)


def test_relora_restart_resets_or_prunes_only_the_moments_of_a_and_b():
  _, params, state = _lora()
  params = {"proj": params, "norm": {"scale": jnp.ones((16,))}}
  tx = optax.adam(1e-2)
  grads = jax.tree.map(lambda p: jnp.arange(p.size, dtype=p.dtype).reshape(p.shape) + 1.0,
                       params)
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(2):
    _, opt_state = update(grads, opt_state, params)
  ts = TrainState(step=jnp.array(10), params=params, opt_state=opt_state,
                  rng=jax.random.key_data(jax.random.key(0)),
                  model_state={"lora": {"proj": state["lora"]}})
  reset = jax.jit(lambda s: relora.relora_merge_state(s, scale=1.0))(ts)
  pruned = jax.jit(lambda s: relora.relora_merge_state(s, scale=1.0, prune=0.9))(ts)
  mu, mu_reset, mu_pruned = opt_state[0].mu, reset.opt_state[0].mu, pruned.opt_state[0].mu
  assert int(reset.opt_state[0].count) == 2  # the step count is kept
  for name in ("lora_a", "lora_b"):
    assert not bool(jnp.any(mu_reset["proj"][name] != 0))
    kept = np.asarray(mu_pruned["proj"][name] != 0)
    assert 0 < kept.mean() <= 0.11  # the largest 10% survive
    big = np.abs(np.asarray(mu["proj"][name]))
    assert big[kept].min() >= big[~kept].max()
  np.testing.assert_array_equal(mu_reset["norm"]["scale"], mu["norm"]["scale"])
  np.testing.assert_array_equal(reset.params["norm"]["scale"], params["norm"]["scale"])


def test_jagged_schedule_re_warms_after_each_restart_under_the_cosine_envelope():
  env = optax.warmup_cosine_decay_schedule(0.0, 1.0, 10, 100, 0.1)
  lr = jagged_cosine(1.0, 10, 100, 0.1, restart_every=25, rewarm_steps=5)
  steps = jnp.arange(100)
  got, want = jax.vmap(lr)(steps), jax.vmap(env)(steps)
  np.testing.assert_allclose(got[:25], want[:25], rtol=1e-6)
  for start in (25, 50, 75):
    for i in range(5):
      np.testing.assert_allclose(got[start + i], want[start + i] * (i + 1) / 5, rtol=1e-6)
    np.testing.assert_allclose(got[start + 5:start + 25], want[start + 5:start + 25],
                               rtol=1e-6)
  assert jagged_cosine(1.0, 10, 100, 0.1)(30) == env(30)  # no restarts: the envelope


def _grads(shape, n, seed=0):
  return [jax.random.normal(jax.random.key(seed + i), shape) for i in range(n)]


@pytest.mark.parametrize("shape", [(8, 12), (12, 8), (3, 8, 8)])
def test_galore_with_full_rank_and_scale_one_is_adam(shape):
  full = min(shape[-2:])
  params = {"w": jnp.zeros(shape), "b": jnp.zeros((shape[-1],))}
  galore = scale_by_galore(full, update_every=3, scale=1.0, b1=0.9, b2=0.99, eps=1e-8)
  adam = optax.scale_by_adam(0.9, 0.99, 1e-8)
  gs, as_ = galore.init(params), adam.init(params)
  step = jax.jit(lambda tx_id, g, s: (galore if tx_id else adam).update(g, s),
                 static_argnums=0)
  for g in _grads(shape, 7):
    grads = {"w": g, "b": g.reshape(-1, shape[-1])[0]}
    ug, gs = step(1, grads, gs)
    ua, as_ = step(0, grads, as_)
    np.testing.assert_allclose(ug["w"], ua["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ug["b"], ua["b"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(8, 20), (20, 8)])
def test_galore_projects_the_smaller_side_refreshes_every_t_and_keeps_moments(shape):
  m, n = shape
  rank = 3
  tx = scale_by_galore(rank, update_every=2, scale=0.25)
  params = {"kernel": jnp.zeros(shape)}
  state = tx.init(params)
  small = min(m, n)
  assert state.proj["kernel"].shape == (small, rank)  # projector on the smaller side
  assert state.mu["kernel"].shape == ((rank, n) if m <= n else (m, rank))
  update = jax.jit(tx.update)
  grads = _grads(shape, 3, seed=10)
  projectors = []
  for g in grads:
    u, state = update({"kernel": g}, state)
    p = state.proj["kernel"]
    projectors.append(p)
    # the update lies in the projector's span on the smaller side
    side = u["kernel"] if m <= n else u["kernel"].T
    np.testing.assert_allclose(p @ (p.T @ side), side, rtol=1e-4, atol=1e-6)
  top = lambda g: (np.linalg.svd(g)[0][:, :rank] if m <= n else np.linalg.svd(g)[2][:rank].T)
  for i, refreshed in ((0, True), (1, False), (2, True)):  # refresh at steps 0, 2
    source = grads[i] if refreshed else grads[i - 1]
    np.testing.assert_allclose(np.abs(projectors[i].T @ top(source)), np.eye(rank), atol=1e-4)
  # moments are not reset at the refresh of step 2
  assert int(state.count) == 3 and bool(jnp.any(state.nu["kernel"] != 0))
  fresh = tx.init(params)
  _, after_one = update({"kernel": grads[2]}, fresh)
  assert not np.allclose(state.mu["kernel"], after_one.mu["kernel"])


# -- fairness fixes (issue 14): clipping on the true gradient, re-warm-up scope ---------------

def _sst_grads(d=16, rank=4, seed=0):
  """(params, model_state, enhanced grads, true grads) of one SST layer on a random loss."""
  from effjax.layers.spectral import SST_COLLECTION, SSTLinear, merged_bases
  layer = SSTLinear(d, rank, "embed", "mlp")
  variables = nn.meta.unbox(jax.jit(layer.init)(jax.random.key(seed), jnp.zeros((1, d))))
  params, state = split_variables(variables)
  x = jax.random.normal(jax.random.key(seed + 1), (32, d))
  target = jax.random.normal(jax.random.key(seed + 2), (32, d))
  enhanced = jax.grad(lambda p: jnp.sum((layer.apply({"params": p, **state}, x) - target) ** 2)
                      )(params)
  s = state[SST_COLLECTION]

  def plain(p):  # the same function without the custom (enhanced) backward pass
    u, v = merged_bases(p["u_cols"], p["v_cols"], s["u"], s["v"], s["idx"])
    return jnp.sum(((x @ u) * p["sigma"] @ v.T - target) ** 2)
  return params, state, enhanced, jax.grad(plain)(params)


def _norm(tree):
  return float(optax.tree.norm(tree))


def test_sst_clipping_measures_the_true_gradient_and_scales_everything_by_one_factor():
  params, state, enhanced, true = _sst_grads()
  true_norm, enhanced_norm = _norm(true), _norm(enhanced)
  assert enhanced_norm > 1.5 * true_norm  # sigma ~ 0.1: the enhanced gradient is far larger
  clip = lowrank.clip_by_true_global_norm
  between = 0.5 * (true_norm + enhanced_norm)  # plain clipping would act here, this must not
  out, _ = clip(between).update(enhanced, optax.EmptyState(), params, model_state=state)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(enhanced)):
    np.testing.assert_array_equal(a, b)
  plain, _ = optax.clip_by_global_norm(between).update(enhanced, optax.EmptyState())
  assert _norm(plain) < 0.99 * enhanced_norm
  out, _ = clip(0.5 * true_norm).update(enhanced, optax.EmptyState(), params, model_state=state)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(enhanced)):  # enhanced stays enhanced
    np.testing.assert_allclose(a, b * 0.5, rtol=1e-5)
  with pytest.raises(ValueError, match=r"needs params and model_state"):
    clip(1.0).update(enhanced, optax.EmptyState(), params)


def test_sst_chain_clips_on_the_true_norm():
  params, state, enhanced, true = _sst_grads()
  max_norm = 0.5 * (_norm(true) + _norm(enhanced))
  args = dict(b1=0.9, b2=0.999, eps=1e-8, sst=True)
  fixed = lowrank.lowrank_chain(lambda s: 1e-3, grad_clip=max_norm, **args)
  unclipped = lowrank.lowrank_chain(lambda s: 1e-3, **args)
  a, _ = fixed.update(enhanced, fixed.init(params), params, model_state=state)
  b, _ = unclipped.update(enhanced, unclipped.init(params), params)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-9)


def test_rewarm_scales_only_the_reset_params_after_each_restart():
  tx = lowrank.scale_by_rewarm(10, 4, ("u_cols", "v_cols"))
  ones = {"embed": jnp.ones(3), "layer": {"sigma": jnp.ones(2), "u_cols": jnp.ones((3, 2)),
                                          "v_cols": jnp.ones((3, 2))}}
  state = tx.init(ones)
  seen = []
  for _ in range(25):
    out, state = tx.update(ones, state)
    seen.append((float(out["layer"]["u_cols"][0, 0]), float(out["layer"]["v_cols"][0, 0]),
                 float(out["layer"]["sigma"][0]), float(out["embed"][0])))
  want = [1.0] * 10 + [0.25, 0.5, 0.75, 1.0] + [1.0] * 6 + [0.25, 0.5, 0.75, 1.0, 1.0]
  assert [s[0] for s in seen] == want == [s[1] for s in seen]
  assert all(s[2] == 1.0 and s[3] == 1.0 for s in seen)  # sigma, embeddings: never re-warmed


@pytest.mark.parametrize("kind, names", [("sst", ("u_cols", "v_cols")),
                                         ("lora", ("lora_a", "lora_b"))])
def test_optimizer_for_rewarms_only_what_the_method_resets(kind, names):
  from effjax.config import (ExperimentConfig, LinearConfig, ModelConfig, OptimConfig,
                             TrainConfig)
  linear = LinearConfig(kind=kind, rank=4, sst_every=20, relora_every=20 if kind == "lora" else 0)
  cfg = ExperimentConfig(model=ModelConfig(linear=linear),
                         optim=OptimConfig(rewarm_steps=2, warmup_steps=5),
                         train=TrainConfig(num_steps=100))
  assert lowrank.reset_params(cfg) == names
  _, lr_fn = lowrank.optimizer_for(cfg)
  envelope = jagged_cosine(cfg.optim.learning_rate, 5, 100, cfg.optim.min_lr_ratio)
  assert float(lr_fn(20)) == float(envelope(20))  # the global schedule does not dip


def test_true_global_norm_is_the_norm_of_the_plain_gradient():
  params, state, enhanced, true = _sst_grads()
  got = float(lowrank.true_global_norm(enhanced, params, state))
  np.testing.assert_allclose(got, _norm(true), rtol=1e-5)
  assert _norm(enhanced) > 1.5 * got  # the enhanced gradient's norm would be far off
  assert float(lowrank.true_global_norm(true, params, {})) == _norm(true)  # no SST: plain


def test_sst_step_logs_the_norm_its_clipping_measures(tfds_dir):
  """The logged grad_norm is where clipping starts: a threshold just above it leaves Adam's
  first moment as without clipping, one just below shrinks it."""
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import sst as sst_configs  # pylint: disable=g-import-not-at-top
  from effjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from effjax.models.decoder_lm import DecoderLM  # pylint: disable=g-import-not-at-top
  from effjax.parallel import build_mesh  # pylint: disable=g-import-not-at-top
  from effjax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  c = sst_configs.get_config("sst,test")
  c.data.data_dir = tfds_dir
  cfg = config_lib.from_config_dict(c)
  model, mesh = DecoderLM(cfg.model), build_mesh(cfg.mesh, jax.devices()[:1])
  tokens = np.random.default_rng(0).integers(0, 256, (2, cfg.data.seq_len + 1)).astype(np.int32)
  batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens),
           "positions": np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape).astype(np.int32)}

  def one_step(grad_clip):
    cfg_clip = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, grad_clip=grad_clip))
    tx, lr_fn = lowrank.optimizer_for(cfg_clip)
    state, _ = step_lib.create_train_state(model, tx, mesh, 0, cfg.data.seq_len)
    new, metrics = jax.jit(step_lib.make_train_step(model, tx, lr_fn))(state, batch)
    return float(metrics["grad_norm"]), jax.tree.leaves(jax.device_get(new.opt_state))

  norm, unclipped = one_step(0.0)
  _, above = one_step(norm * 1.001)  # the enhanced norm is only ~2% above at init
  _, below = one_step(norm * 0.999)
  assert all(np.array_equal(a, b) for a, b in zip(above, unclipped))
  assert not all(np.allclose(b, u) for b, u in zip(below, unclipped))
