"""The Lorentz layers (effjax/layers/lorentz.py) and the fully hyperbolic LM
(effjax/models/hyperbolic_lm.py, configs/hyperbolic.py).

Manifold tolerance: lorentz.manifold_error(x) = |<x, x>_L + K| / max(x_0^2, K) <= 1e-5 in
float32 (rounding of x_0^2 alone is ~1e-7 of it)."""
import dataclasses
import functools
import os
import sys

import flax.linen as nn
import jax
import optax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import config as config_lib
from effjax.config import LinearConfig, ModelConfig
from effjax.layers import lorentz, spectral
from effjax.models import hyperbolic_lm
from effjax.models.decoder_lm import DecoderLM

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from configs import hyperbolic as hyperbolic_configs  # noqa: E402  pylint: disable=g-import-not-at-top

TOL = 1e-5
# one block of each kind is enough to check every layer type; small so compiles are short
MODEL = ModelConfig(vocab_size=384, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1,
                    d_ff=32, geometry="hyperbolic")


def _init(model, tokens, key=1):
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(key), tokens))


def _points(key, shape, k, radius):
  """Random points of H (ambient shape[-1]) whose space parts have norm `radius`."""
  s = jax.random.normal(key, shape[:-1] + (shape[-1] - 1,))
  s = s / jnp.linalg.norm(s, axis=-1, keepdims=True) * radius
  return lorentz.from_space(s, k)


@pytest.mark.parametrize("k", [0.5, 1.0, 3.0])
def test_expmap0_and_logmap0_are_inverse_and_land_on_the_manifold(k):
  key = jax.random.key(0)
  for radius in (1e-6, 1e-2, 1.0, 5.0):
    u = jax.random.normal(key, (64, 7))
    u = u / jnp.linalg.norm(u, axis=-1, keepdims=True) * radius
    x = lorentz.expmap0(u, k)
    assert float(jnp.max(lorentz.manifold_error(x, k))) < TOL
    np.testing.assert_allclose(lorentz.logmap0(x, k), u, rtol=1e-5, atol=1e-7 * max(radius, 1))
    if radius >= 1e-2:  # the geodesic distance to the origin is |u|
      d = np.sqrt(k) * np.arccosh(np.asarray(x[:, 0], np.float64) / np.sqrt(k))
      np.testing.assert_allclose(d, radius, rtol=1e-3)
    y = _points(key, (64, 8), k, radius)
    np.testing.assert_allclose(lorentz.expmap0(lorentz.logmap0(y, k), k), y, rtol=1e-5,
                               atol=1e-6)


def _linear(kind="dense", features=8, **kw):
  return lorentz.LorentzLinear(features, LinearConfig(kind=kind, rank=2), "qkv", "embed",
                               "heads", **kw)


def test_lorentz_linear_with_identity_weight_is_the_identity_without_time_scaling():
  """HyboNet's f_x(M) = [sqrt(|Wx|^2 + K); Wx] with W = [0 | I] (our W = I: its time row is
  ignored) keeps every point; the time-scaled layer (HyboNet's default) does not."""
  k = 1.7
  x = _points(jax.random.key(1), (5, 8), k, 2.0)
  layer = _linear(time_scaling=False)
  params = layer.init(jax.random.key(0), x, k)["params"]
  params = nn.meta.unbox(params)
  params = jax.tree.map(jnp.zeros_like, params)
  params["w"]["kernel"] = jnp.eye(8)
  np.testing.assert_allclose(layer.apply({"params": params}, x, k), x, rtol=1e-6)
  scaled = _linear(time_scaling=True)
  sparams = nn.meta.unbox(scaled.init(jax.random.key(0), x, k)["params"])
  sparams["w"]["kernel"] = jnp.eye(8)
  sparams["bias"] = jnp.zeros(8)
  y = scaled.apply({"params": sparams}, x, k)
  assert float(jnp.max(lorentz.manifold_error(y, k))) < TOL
  assert float(jnp.max(jnp.abs(y - x))) > 0.1
  # time = sqrt(K) (lambda sigmoid(x_0) + 1.1), lambda = time_scale = 10 at init
  np.testing.assert_allclose(y[:, 0], np.sqrt(k) * (10 * jax.nn.sigmoid(x[:, 0]) + 1.1),
                             rtol=1e-5)


@pytest.mark.slow
def test_time_scale_learning_switch_and_dropout():
  k = 1.0
  x = _points(jax.random.key(2), (4, 8), k, 1.0)

  def grad_of_scale(learn):
    layer = _linear(learn_time_scale=learn)
    params = nn.meta.unbox(layer.init(jax.random.key(0), x, k)["params"])
    g = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x, k)[..., 0]))(params)
    return float(jnp.abs(g["log_time_scale"]))

  assert grad_of_scale(True) > 0 and grad_of_scale(False) == 0.0
  layer = _linear(dropout=0.5)
  params = layer.init(jax.random.key(0), x, k)
  det = layer.apply(params, x, k)
  drop = layer.apply(params, x, k, deterministic=False, rngs={"noise": jax.random.key(3)})
  assert float(jnp.max(jnp.abs(det - drop))) > 1e-3
  assert float(jnp.max(lorentz.manifold_error(drop, k))) < TOL
  y = lorentz.lorentz_dropout(x, k, 0.5, jax.random.key(4), deterministic=False)
  assert float(jnp.max(lorentz.manifold_error(y, k))) < TOL and not np.allclose(y, x)


@pytest.mark.slow
def test_sst_lorentz_linear_equals_dense_lorentz_linear_with_the_same_weight_at_init():
  k = 1.0
  x = _points(jax.random.key(5), (6, 16), k, 1.5)
  sst = _linear("sst", features=12, heads=3)
  variables = nn.meta.unbox(sst.init(jax.random.key(0), x, k))
  params, state = variables["params"], variables[spectral.SST_COLLECTION]
  w = spectral.sst_dense_weight(params["w"], state["w"])
  dense = _linear("dense", features=12, heads=3)
  dparams = {"w": {"kernel": w}, "bias": params["bias"],
             "log_time_scale": params["log_time_scale"]}
  y_sst = sst.apply(variables, x, k)
  y_dense = dense.apply({"params": dparams}, x, k)
  assert float(jnp.linalg.norm(y_sst - y_dense) / jnp.linalg.norm(y_dense)) < 1e-5
  for head in jnp.split(y_sst, 3, axis=-1):  # each head's point is on H
    assert float(jnp.max(lorentz.manifold_error(head, k))) < TOL


@pytest.mark.slow
def test_centroid_residual_and_attention_stay_on_the_manifold():
  k = 0.7
  keys = jax.random.split(jax.random.key(6), 3)
  q, kk, v = (_points(key, (2, 5, 2, 6), k, r) for key, r in zip(keys, (0.5, 2.0, 4.0)))
  mask = jnp.tril(jnp.ones((5, 5), bool))[None, None, None]
  out = lorentz.lorentz_attention(q, kk, v, mask, k, 0.3)
  assert float(jnp.max(lorentz.manifold_error(out, k))) < TOL
  # the first query sees only the first value: the centroid of one point is that point
  np.testing.assert_allclose(out[:, 0], v[:, 0], rtol=1e-5)
  res = lorentz.lorentz_residual(q, v, k)
  assert float(jnp.max(lorentz.manifold_error(res, k))) < TOL
  # -d^2 from 2K + 2 <x, y>_L is 0 on the diagonal
  np.testing.assert_allclose(lorentz.sq_distance(v, v, k), 0.0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("radius", [0.0, 1e-4, 30.0])
def test_gradients_are_finite_near_and_far_from_the_origin(radius):
  k = 1.0
  x = _points(jax.random.key(7), (3, 4, 8), k, max(radius, 1e-30))
  if radius == 0.0:
    x = jnp.broadcast_to(lorentz.origin(8, k), x.shape)
  lin, norm = _linear(features=8), lorentz.LorentzLayerNorm()
  lp = lin.init(jax.random.key(0), x, k)
  npar = norm.init(jax.random.key(0), x, k)

  def loss(x, lp, npar):
    h = norm.apply(npar, x, k)
    h = lorentz.lorentz_residual(x, lin.apply(lp, h, k), k)
    att = lorentz.lorentz_attention(h[:, :, None], h[:, :, None], h[:, :, None],
                                    jnp.ones((1, 1, 1, 4, 4), bool), k, 0.5)
    return (jnp.sum(lorentz.logmap0(att, k)) + jnp.sum(lorentz.expmap0(x[..., 1:], k))
            + jnp.sum(lorentz.logmap0(x, k)))

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, lp, npar)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.slow
def test_every_layer_of_the_hyperbolic_lm_outputs_points_of_the_manifold():
  model = DecoderLM(MODEL)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  variables = _init(model, tokens)
  assert hyperbolic_lm.ACTIVATIONS_COLLECTION not in variables  # never model state
  logits, sown = jax.jit(functools.partial(
      model.apply, mutable=[hyperbolic_lm.ACTIVATIONS_COLLECTION]))(variables, tokens)
  assert logits.shape == (2, 16, 384) and logits.dtype == jnp.float32
  points = hyperbolic_lm.layer_activations(sown)
  assert len(points) == 2 + 10 * MODEL.num_layers  # embedding, final norm, 10 per block
  for name, x in points.items():
    err = float(jnp.max(lorentz.manifold_error(x, MODEL.hyperbolic.curvature)))
    assert err < TOL, (name, err)


@pytest.mark.drill  # minutes of training; `make test-drills` (CI) runs it
def test_learned_curvature_gets_a_gradient_and_the_model_is_causal():
  cfg = dataclasses.replace(MODEL, hyperbolic=config_lib.HyperbolicConfig(
      learn_curvature=True, curvature=2.0))
  model = DecoderLM(cfg)
  tokens = jax.random.randint(jax.random.key(0), (1, 12), 0, 256)
  params = _init(model, tokens)["params"]
  np.testing.assert_allclose(jnp.exp(params["hyperbolic"]["log_curvature"]), 2.0, rtol=1e-6)
  g = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, tokens))))(params)
  assert float(jnp.abs(g["hyperbolic"]["log_curvature"])) > 0
  changed = tokens.at[0, 8].set((tokens[0, 8] + 1) % 256)
  apply = jax.jit(model.apply)
  a, b = apply({"params": params}, tokens), apply({"params": params}, changed)
  np.testing.assert_array_equal(a[0, :8], b[0, :8])
  assert not np.allclose(a[0, 8:], b[0, 8:])


@pytest.mark.parametrize("field,value,words", [
    ("ffn", "moe", "model.ffn='moe'"),
    ("attention_impl", "pallas", "attention_impl='pallas'"),
    ("dtype", "bfloat16", "model.dtype='bfloat16'"),
    ("scan_layers", True, "scan_layers=True"),
    ("linear", LinearConfig(kind="monarch"), "'monarch'"),
    ("geometry", "spherical", "model.geometry='spherical'"),
])
def test_configurations_hyperbonet_does_not_define_are_refused_by_name(field, value, words):
  with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
    dataclasses.replace(MODEL, **{field: value})


def test_hyperbolic_fields_are_validated_and_not_silently_ignored():
  with pytest.raises(ValueError, match="model.hyperbolic.curvature"):
    config_lib.HyperbolicConfig(curvature=0.0)
  with pytest.raises(ValueError, match="model.hyperbolic.dropout"):
    config_lib.HyperbolicConfig(dropout=1.0)
  with pytest.raises(ValueError, match="geometry='euclidean' ignores it"):
    ModelConfig(hyperbolic=config_lib.HyperbolicConfig(curvature=2.0))
  with pytest.raises(NotImplementedError, match="decoding"):
    DecoderLM(MODEL).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32), decode="step")
  with pytest.raises(ValueError, match="unknown variant 'huge'"):
    hyperbolic_configs.get_config("huge")


@pytest.mark.parametrize("method", ["full", "lora", "relora", "galore", "sst"])
def test_config_switches_put_each_method_inside_the_lorentz_layers(method):
  cfg = config_lib.from_config_dict(hyperbolic_configs.get_config(f"test,{method}"))
  assert cfg.model.geometry == "hyperbolic"
  tokens = jnp.zeros((1, 8), jnp.int32)
  variables = jax.eval_shape(DecoderLM(cfg.model).init, jax.random.key(0), tokens)
  w = nn.meta.unbox(variables["params"])["hyperbolic"]["layers_0"]["query"]["w"]
  expect = {"full": {"kernel"}, "galore": {"kernel"}, "lora": {"lora_a", "lora_b"},
            "relora": {"lora_a", "lora_b"}, "sst": set(spectral.PARAM_NAMES)}[method]
  assert expect <= set(w), (method, sorted(w))
  assert (cfg.optim.galore_rank > 0) == (method == "galore")
  assert (cfg.model.linear.relora_every > 0) == (method == "relora")


@pytest.mark.drill  # minutes of training; `make test-drills` (CI) runs it
def test_manifold_membership_holds_after_training_steps():
  """AdamW steps at a high learning rate on random tokens move every weight far from its
  init; every layer's output must still lie on the hyperboloid."""
  model = DecoderLM(MODEL)
  tokens = jax.random.randint(jax.random.key(0), (4, 17), 0, 256)
  params = _init(model, tokens[:, :-1])["params"]
  tx = optax.adamw(3e-2)

  @jax.jit
  def train(params):
    def step(carry, _):
      params, opt = carry
      loss, g = jax.value_and_grad(lambda p: jnp.mean(
          optax.softmax_cross_entropy_with_integer_labels(
              model.apply({"params": p}, tokens[:, :-1]), tokens[:, 1:])))(params)
      updates, opt = tx.update(g, opt, params)
      return (optax.apply_updates(params, updates), opt), loss
    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), None, length=30)
    _, sown = model.apply({"params": params}, tokens[:, :-1],
                          mutable=[hyperbolic_lm.ACTIVATIONS_COLLECTION])
    errors = jax.tree.map(lambda x: jnp.max(lorentz.manifold_error(x, 1.0)),
                          hyperbolic_lm.layer_activations(sown))
    return losses, errors

  losses, errors = train(params)
  assert float(losses[-1]) < float(losses[0]) - 1.0  # it did train
  for name, err in errors.items():
    assert float(err) < TOL, (name, float(err))


@pytest.mark.drill
def test_hyperbolic_run_resumes_exactly_and_stays_on_the_manifold(tfds_dir, tmp_path):
  from effjax.train.checkpoint import load_checkpoint  # pylint: disable=g-import-not-at-top
  from effjax.train.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  from effjax.train.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  c = hyperbolic_configs.get_config("test,sst")
  c.data.data_dir = tfds_dir
  c.model.linear.sst_every = 2
  c.train.update(num_steps=6, log_every=1, checkpoint_every=3, eval_every=0)
  cfg = config_lib.from_config_dict(c)

  def losses(workdir):
    m = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    return {s: v["train_loss"] for s, v in sorted(m.items()) if "train_loss" in v}

  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train_and_evaluate(cfg, straight)
  train_and_evaluate(cfg, resumed, should_stop=lambda step: step == 3)
  assert max(losses(resumed)) == 3
  train_and_evaluate(cfg, resumed)
  assert losses(resumed) == losses(straight)  # exact, SST resamples included
  assert losses(straight)[6] < losses(straight)[1]
  _, state, _ = load_checkpoint(cfg, straight)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  _, sown = DecoderLM(cfg.model).apply(
      {"params": state.params, **state.model_state}, tokens,
      mutable=[hyperbolic_lm.ACTIVATIONS_COLLECTION])
  for name, x in hyperbolic_lm.layer_activations(sown).items():
    assert float(jnp.max(lorentz.manifold_error(x, 1.0))) < TOL, name
