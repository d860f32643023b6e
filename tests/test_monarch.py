"""Monarch layers: the layer, its dense equivalent, projection, the LM, reverse sparsification."""
import dataclasses
import functools
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import lm as lm_configs
from configs import monarch as monarch_configs
from effjax.optim import adamw
from effjax import config as config_lib
from effjax.config import ExperimentConfig, LinearConfig, MeshConfig, ModelConfig, OptimConfig
from effjax.layers.monarch import (MonarchLinear, activation_copies, monarch_multiply,
                                   monarch_multiply_reference, monarch_param_count,
                                   monarch_shapes, monarch_to_dense, project_to_monarch)
from effjax.models.decoder_lm import (DecoderLM, count_params, flops_per_token,
                                      projection_macs_per_token)
from effjax.parallel import LOGICAL_RULES, build_mesh
from effjax.train import step as step_lib
from effjax.train import surgery
from effjax.train.checkpoint import Checkpointer
from effjax.train.loop import train_and_evaluate
from effjax.train.metrics import read_metrics

# (in, out, nblocks): square, expanding, contracting, not divisible, k = width, k = 1
SHAPES = [(16, 16, 4), (8, 32, 4), (32, 8, 4), (13, 27, 4), (27, 13, 3), (10, 10, 10),
          (12, 20, 1)]


def _init(n_in, n_out, k, seed=0, **kw):
  layer = MonarchLinear(n_out, nblocks=k, **kw)
  params = jax.jit(layer.init)(jax.random.key(seed), jnp.zeros((1, n_in)))["params"]
  return layer, nn.meta.unbox(params)


to_dense = jax.jit(monarch_to_dense, static_argnums=(1, 2))
project = jax.jit(project_to_monarch, static_argnums=1)


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _permutation_matrix(m):
  """P: reshape to m x m, transpose, flatten (the paper's stride permutation), as a matrix."""
  perm = np.arange(m * m).reshape(m, m).T.reshape(-1)
  return np.eye(m * m)[perm]


@pytest.mark.parametrize("n_in, n_out, k", SHAPES)
def test_layer_equals_dense_matrix_from_its_factors_and_projection_recovers_it(n_in, n_out, k):
  layer, params = _init(n_in, n_out, k)
  x = jax.random.normal(jax.random.key(1), (2, 3, n_in))  # batched, two leading axes
  y = jax.jit(layer.apply)({"params": params}, x)
  w = to_dense(params, n_in, n_out)
  assert y.shape == (2, 3, n_out) and w.shape == (n_in, n_out)
  np.testing.assert_allclose(y, jnp.einsum("bli,io->blo", x, w), rtol=1e-5, atol=1e-5)
  # project_to_monarch(monarch_to_dense(p)) gives (other) factors of the same dense matrix
  projected = project(w, k)
  assert jax.tree.map(jnp.shape, projected) == jax.tree.map(jnp.shape, params)
  assert _rel(to_dense(projected, n_in, n_out), w) < 1e-5


# (in, out, nblocks): square, expanding, contracting, padded output, padded both ways
LAYOUT_CASES = [(64, 64, 4), (32, 128, 8), (128, 32, 2), (50, 70, 4), (70, 50, 8)]


def _factors_and_data(n_in, n_out, k, tokens):
  w1_shape, w2_shape = monarch_shapes(n_in, n_out, k)
  keys = jax.random.split(jax.random.key(n_in * 1000 + n_out * 10 + k), 4)
  return (jax.random.normal(keys[0], w1_shape) / np.sqrt(w1_shape[-1]),
          jax.random.normal(keys[1], w2_shape) / np.sqrt(w2_shape[-1]),
          jax.random.normal(keys[2], (tokens, n_in)),
          jax.random.normal(keys[3], (tokens, n_out)))


def _forward_backward(multiply, x, w1, w2, dy):
  """One layer's forward and backward: y and the cotangents of (x, w1, w2) for dy."""
  y, vjp = jax.vjp(multiply, x, w1, w2)
  return (y,) + vjp(dy.astype(y.dtype))


def _reference_multiply(n_out):
  def multiply(x, w1, w2):
    k, _, p = w1.shape
    x = jnp.pad(x, ((0, 0), (0, k * p - x.shape[-1])))
    return monarch_multiply_reference(x, w1, w2)[:, :n_out]
  return multiply


@pytest.mark.slow
@pytest.mark.parametrize("n_in, n_out, k", LAYOUT_CASES)
def test_copy_free_multiply_equals_the_reference_forward_and_gradients(n_in, n_out, k):
  w1, w2, x, g = _factors_and_data(n_in, n_out, k, tokens=24)
  new = functools.partial(monarch_multiply, out_features=n_out)
  ref = _reference_multiply(n_out)

  # bf16-representable inputs, so that the bf16 run and the float32 runs see the same values
  x, w1, w2 = (a.astype(jnp.bfloat16).astype(jnp.float32) for a in (x, w1, w2))

  @jax.jit
  def runs(x, w1, w2, g):
    bf16 = [a.astype(jnp.bfloat16) for a in (x, w1, w2)]
    return (_forward_backward(new, x, w1, w2, g), _forward_backward(ref, x, w1, w2, g),
            _forward_backward(new, *bf16, g))

  f32, f32_ref, bf16 = runs(x, w1, w2, g)
  for name, a, b, c in zip(("y", "dx", "dw1", "dw2"), f32, f32_ref, bf16):
    assert a.shape == b.shape and a.dtype == jnp.float32 and c.dtype == jnp.bfloat16, name
    assert float(jnp.linalg.norm(b)) > 0, name
    assert _rel(a, b) < 1e-5, name
    assert _rel(c.astype(jnp.float32), b) < 1e-2, name


def test_copy_free_multiply_keeps_leading_axes_and_rejects_mismatched_factors():
  w1, w2, x, _ = _factors_and_data(50, 70, 4, tokens=6)
  y = monarch_multiply(x.reshape(2, 3, 50), w1, w2, 70)
  np.testing.assert_allclose(y.reshape(6, 70), _reference_multiply(70)(x, w1, w2),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"x \[\.\.\., 50\] -> 80 does not fit factors"):
    monarch_multiply(x, w1, w2, 80)  # 4 blocks of 18 outputs hold at most 72
  with pytest.raises(ValueError, match=r"x \[\.\.\., 60\] -> 70 does not fit factors"):
    monarch_multiply(jnp.zeros((2, 60)), w1, w2, 70)


def _copies(multiply, n_in, n_out, k, dtype=jnp.float32):
  tokens = 4 * max(n_in, n_out)  # so that only activations reach the size threshold
  w1, w2, x, g = (a.astype(dtype) for a in _factors_and_data(n_in, n_out, k, tokens))
  step = jax.jit(functools.partial(_forward_backward, multiply))
  hlo = step.lower(x, w1, w2, g).compile().as_text()
  return activation_copies(hlo, tokens * min(n_in, n_out))


@pytest.mark.parametrize("n_in, n_out, k", LAYOUT_CASES)
def test_copy_free_forward_and_backward_hold_the_minimum_six_activation_copies(n_in, n_out, k):
  # x, the stride permutation and y in the forward; dy, dh and dx in the backward.
  copies = _copies(functools.partial(monarch_multiply, out_features=n_out), n_in, n_out, k)
  assert len(copies) == 6, "\n".join(copies)


@pytest.mark.slow
def test_activation_copies_counts_what_the_reference_formulation_adds():
  """The counter sees the reference's extra copies, bf16 does not add any, k = 1 needs none."""
  assert len(_copies(_reference_multiply(70), 50, 70, 4)) > 6
  bf16 = _copies(functools.partial(monarch_multiply, out_features=64), 64, 64, 4, jnp.bfloat16)
  assert len(bf16) == 6
  assert not _copies(functools.partial(monarch_multiply, out_features=20), 12, 20, 1)


@pytest.mark.parametrize("m", [3, 4])
def test_square_canonical_form_is_p_l_p_r(m):
  """k = sqrt(n): the paper's M = P L P^T R with block-diagonal L and R, in numpy."""
  _, params = _init(m * m, m * m, m, seed=3)
  w1, w2 = np.asarray(params["w1"]), np.asarray(params["w2"])
  r = np.zeros((m * m, m * m))
  l = np.zeros((m * m, m * m))
  for j in range(m):
    r[j * m:(j + 1) * m, j * m:(j + 1) * m] = w1[j]
    l[j * m:(j + 1) * m, j * m:(j + 1) * m] = w2[j]
  p = _permutation_matrix(m)
  m_matrix = p @ l @ p.T @ r  # acts on column vectors
  np.testing.assert_allclose(to_dense(params), m_matrix.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_in, n_out, k", [(64, 64, 4), (24, 42, 4), (30, 18, 3)])
def test_projection_beats_every_other_monarch_matrix_tried(n_in, n_out, k):
  w = jax.random.normal(jax.random.key(0), (n_in, n_out))
  best = project(w, k)
  err = _rel(to_dense(best, n_in, n_out), w)
  assert 0.05 < err < 1  # a Gaussian matrix is far from Monarch, but the fit explains some
  keys = jax.random.split(jax.random.key(1), 18)
  for i, key in enumerate(keys):
    scale = (1e-3, 1e-2, 1e-1)[i % 3]
    k1, k2 = jax.random.split(key)
    other = {"w1": best["w1"] + scale * jax.random.normal(k1, best["w1"].shape),
             "w2": best["w2"] + scale * jax.random.normal(k2, best["w2"].shape)}
    assert _rel(to_dense(other, n_in, n_out), w) >= err * (1 - 1e-6)
  _, random_params = _init(n_in, n_out, k)  # and an unrelated Monarch matrix
  assert _rel(to_dense(random_params, n_in, n_out), w) > err


def test_projection_maps_over_leading_axes():
  _, a = _init(12, 20, 2, seed=0)
  _, b = _init(12, 20, 2, seed=1)
  stacked = jnp.stack([to_dense(a, 12, 20), to_dense(b, 12, 20)])
  projected = project(stacked, 2)
  assert projected["w1"].shape[0] == 2
  np.testing.assert_allclose(to_dense(projected, 12, 20), stacked, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_in, n_out, k", SHAPES + [(64, 256, 4), (256, 64, 4)])
def test_parameter_count_matches_the_formula(n_in, n_out, k):
  _, params = _init(n_in, n_out, k, use_bias=True)
  n = count_params(params)
  assert n == monarch_param_count(n_in, n_out, k, use_bias=True)
  p, s = -(-n_in // k), -(-n_out // k)
  assert n == k * min(p, s) * (p + s) + n_out  # k blocks, q = min(p, s)
  if n_in % k == 0 and n_out % k == 0:
    assert n - n_out == min(n_in, n_out) * (n_in + n_out) // k  # the paper's formula


def test_gradients_equal_dense_gradients_mapped_through_the_factors():
  n_in, n_out, k = 13, 27, 4
  layer, params = _init(n_in, n_out, k)
  x = jax.random.normal(jax.random.key(1), (5, n_in))
  target = jax.random.normal(jax.random.key(2), (5, n_out))

  def loss_of_output(y):
    return jnp.sum(jnp.tanh(y) * target)

  grads = jax.grad(lambda p: loss_of_output(layer.apply({"params": p}, x)))(params)
  w, to_dense_vjp = jax.vjp(lambda p: monarch_to_dense(p, n_in, n_out), params)
  grad_w = jax.grad(lambda w: loss_of_output(x @ w))(w)
  (mapped,) = to_dense_vjp(grad_w)
  for name in ("w1", "w2"):
    assert float(jnp.abs(grads[name]).max()) > 1e-3
    np.testing.assert_allclose(grads[name], mapped[name], rtol=1e-5, atol=1e-6)


def test_sharded_over_four_devices_gives_the_same_output():
  """Blocks over tensor, each factor's rows over fsdp (FSDP: no factor is whole on a chip)."""
  mesh = build_mesh(MeshConfig(data=1, fsdp=2, tensor=2), jax.devices()[:4])
  layer = MonarchLinear(48, nblocks=4, use_bias=True, out_axis="mlp")
  x = jax.random.normal(jax.random.key(1), (8, 40))
  boxed = layer.init(jax.random.key(0), x)["params"]
  params = nn.meta.unbox(boxed)
  reference = layer.apply({"params": params}, x)
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, LOGICAL_RULES)
  assert shardings["w1"].spec == P("tensor", "fsdp", None)
  assert shardings["w2"].spec == P("tensor", "fsdp", None)
  sharded = jax.device_put(params, shardings)
  assert len(sharded["w1"].addressable_shards) == 4
  for name in ("w1", "w2"):  # two of the four blocks, half of each one's rows
    k, rows, cols = params[name].shape
    assert sharded[name].addressable_shards[0].data.shape == (k // 2, rows // 2, cols)
  with step_lib.sharding_context(mesh):
    out = jax.jit(lambda p, x: layer.apply({"params": p}, x))(sharded, x)
  out = jax.block_until_ready(out)
  np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make, message", [
    (lambda: _init(8, 8, 0), r"nblocks must be a positive integer, got 0"),
    (lambda: _init(8, 8, -2), r"nblocks must be a positive integer, got -2"),
    (lambda: _init(6, 32, 8), r"MonarchLinear.*nblocks=8 is larger than the layer's width "
                              r"\(in_features=6, out_features=32\)"),
    (lambda: project_to_monarch(jnp.ones((8, 3)), 4), r"project_to_monarch: nblocks=4 is "
                                                       r"larger than the layer's width"),
    (lambda: LinearConfig(nblocks=0), r"model.linear.nblocks must be an integer >= 1, got 0"),
    (lambda: LinearConfig(mlp="butterfly"), r"model.linear.mlp='butterfly' is not one of"),
    (lambda: ModelConfig(d_model=32, num_heads=4, num_kv_heads=2, d_ff=64,
                         linear=LinearConfig(qkv="monarch", nblocks=32)),
     r"model.linear.nblocks=32 is larger than the narrowest 'qkv' projection \(16 wide"),
    (lambda: ExperimentConfig(train=dataclasses.replace(ExperimentConfig().train,
                                                        dense_from_step=10)),
     r"train.dense_from_step=10 converts Monarch layers to dense, but model.linear uses no "
     r"Monarch layer"),
])
def test_bad_input_fails_clearly(make, message):
  with pytest.raises(ValueError, match=message):
    make()


@pytest.mark.parametrize("variant", ["mlp", "all", "reverse", "finetune", "mlp,test",
                                     "reverse,small"])
def test_monarch_config_variants_are_valid(variant):
  cfg = config_lib.from_config_dict(monarch_configs.get_config(variant))
  assert cfg.model.linear.uses_monarch and cfg.model.linear.nblocks == 4
  assert (cfg.train.dense_from_step > 0) == variant.startswith("reverse")
  with pytest.raises(ValueError, match="unknown variant 'butterfly' of configs/monarch.py"):
    monarch_configs.get_config("butterfly")


LM = ModelConfig(vocab_size=300, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64)


def _init_lm(model):
  return nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])


def _lm(linear, **kw):
  cfg = dataclasses.replace(LM, linear=linear, **kw)
  model = DecoderLM(cfg)
  return cfg, model, jax.jit(lambda: _init_lm(model))()


def _abstract(model):
  return jax.eval_shape(lambda: _init_lm(model))


def _lm_shapes(linear, **kw):
  cfg = dataclasses.replace(LM, linear=linear, **kw)
  return cfg, _abstract(DecoderLM(cfg))


def test_lm_chooses_the_kind_per_projection_group():
  _, params = _lm_shapes(LinearConfig(mlp="monarch", attn_out="monarch", nblocks=2))
  layer = params["layers_0"]
  assert set(layer["mlp"]["wi_gate"]) == {"w1", "w2"} and set(layer["mlp"]["wo"]) == {"w1", "w2"}
  assert set(layer["attn"]["out"]) == {"w1", "w2"} and layer["attn"]["out"]["w1"].shape[0] == 2
  assert set(layer["attn"]["query"]) == {"kernel"} and set(layer["attn"]["value"]) == {"kernel"}
  _, everywhere = _lm_shapes(LinearConfig(kind="monarch", mlp="dense"))
  assert set(everywhere["layers_1"]["attn"]["key"]) == {"w1", "w2"}
  assert set(everywhere["layers_1"]["mlp"]["wo"]) == {"kernel"}


@pytest.mark.parametrize("linear", [LinearConfig(kind="monarch"), LinearConfig(mlp="monarch"),
                                    LinearConfig(kind="monarch", nblocks=8)])
def test_lm_parameter_count_and_flops_follow_the_formula(linear):
  cfg, params = _lm_shapes(linear)
  dense_cfg, dense_params = _lm_shapes(LinearConfig())
  dense_macs = projection_macs_per_token(dense_cfg)
  macs = projection_macs_per_token(cfg)
  # parameters differ from dense exactly by the projections' weight counts
  assert count_params(dense_params) - count_params(params) == dense_macs - macs
  expected = 0
  for group, shapes in cfg.projection_shapes().items():
    for n_in, n_out in shapes:
      expected += (monarch_param_count(n_in, n_out, linear.nblocks)
                   if linear.kind_for(group) == "monarch" else n_in * n_out)
  assert macs == expected * cfg.num_layers
  assert macs < dense_macs
  f, fd = flops_per_token(cfg, 64), flops_per_token(dense_cfg, 64)
  assert fd["train"] - f["train"] == 3 * 2 * (dense_macs - macs)


@pytest.mark.parametrize("linear, scan", [(LinearConfig(kind="monarch"), False),
                                          (LinearConfig(mlp="monarch"), True)])
def test_lm_surgery_monarch_to_dense_keeps_the_function_and_projection_inverts_it(linear, scan):
  cfg, model, params = _lm(linear, scan_layers=scan)
  dense_model = DecoderLM(dataclasses.replace(cfg, linear=cfg.linear.all_dense()))
  dense_target, monarch_target = _abstract(dense_model), _abstract(model)
  dense = jax.jit(surgery.monarch_params_to_dense)(params, dense_target)
  assert count_params(dense) > count_params(params)
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 256)
  apply = jax.jit(model.apply)
  logits = apply({"params": params}, tokens)
  np.testing.assert_allclose(jax.jit(dense_model.apply)({"params": dense}, tokens), logits,
                             rtol=1e-5, atol=1e-5)
  back = jax.jit(surgery.project_params_to_monarch)(dense, monarch_target)
  assert jax.tree.map(jnp.shape, back) == jax.tree.map(jnp.shape, params)
  np.testing.assert_allclose(apply({"params": back}, tokens), logits, rtol=1e-4, atol=1e-4)


def test_densify_keeps_counts_and_moments_of_unchanged_params_and_zeroes_new_ones():
  cfg, model, params = _lm(LinearConfig(mlp="monarch"))
  dense_model = DecoderLM(dataclasses.replace(cfg, linear=cfg.linear.all_dense()))
  tx = adamw.make_optimizer(OptimConfig(), 100)
  state = step_lib.TrainState(step=jnp.array(7), params=params, opt_state=tx.init(params),
                              rng=jax.random.key_data(jax.random.key(0)))
  grads = jax.tree.map(jnp.ones_like, params)

  @jax.jit
  def update(state):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(params=jax.tree.map(jnp.add, state.params, updates), opt_state=opt_state)

  for _ in range(3):  # non-zero moments and counts
    state = update(state)
  new = jax.jit(lambda s: surgery.densify_train_state(s, _abstract(dense_model), tx))(state)
  assert jax.tree.structure(new.opt_state) == jax.tree.structure(tx.init(new.params))
  old_leaves = {jax.tree_util.keystr(p): v
                for p, v in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]}
  kept = zeroed = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(new.opt_state)[0]:
    name = jax.tree_util.keystr(path)
    if "count" in name:
      assert int(leaf) == 3
    elif "['mlp']" in name:  # the new dense MLP kernels: fresh moments
      assert "kernel" in name and not bool(jnp.any(leaf != 0))
      zeroed += 1
    elif name in old_leaves:
      np.testing.assert_array_equal(leaf, old_leaves[name])
      kept += bool(jnp.any(leaf != 0))
  assert kept > 0 and zeroed == 2 * 3 * cfg.num_layers  # mu and nu of 3 kernels per layer
  assert int(new.step) == 7


def _metrics(workdir):
  return read_metrics(os.path.join(workdir, "metrics.jsonl"))


def _losses(workdir):
  return {s: m["train_loss"] for s, m in sorted(_metrics(workdir).items()) if "train_loss" in m}


def _test_config(tfds_dir, kind="monarch", mlp="", **train):
  c = lm_configs.get_config("test")
  c.data.data_dir = tfds_dir
  c.model.linear.update(kind=kind, mlp=mlp)
  c.train.update(**train)
  return config_lib.from_config_dict(c)


@pytest.fixture(scope="module")
def reverse_runs(tfds_dir, tmp_path_factory):
  """An 8-step run switching to dense after step 4, and a copy of it as if it had died after
  its checkpoint at step 4 (whose weights are dense and exactly Monarch)."""
  cfg = _test_config(tfds_dir, num_steps=8, log_every=1, checkpoint_every=4, eval_every=4,
                     dense_from_step=4)
  root = tmp_path_factory.mktemp("reverse")
  straight, stopped = str(root / "straight"), str(root / "stopped")
  train_and_evaluate(cfg, straight)
  assert Checkpointer(os.path.join(straight, "checkpoints")).all_steps() == [4, 8]
  shutil.copytree(straight, stopped)
  shutil.rmtree(os.path.join(stopped, "checkpoints", "8"))
  return cfg, straight, stopped


@pytest.mark.drill  # minutes of training; `make test-drills` (CI) runs it
def test_reverse_sparsification_switch_keeps_the_loss(reverse_runs):
  _, straight, _ = reverse_runs
  m = _metrics(straight)
  assert m[0]["params"] < m[4]["params"]  # logged at the start and after the switch
  assert m[0]["flops_per_token"] < m[4]["flops_per_token"]
  # the same batch scored just before and just after the switch: the function is unchanged
  np.testing.assert_allclose(m[4]["densify_loss_after"], m[4]["densify_loss_before"],
                             rtol=1e-6)
  assert m[8]["eval_loss"] < m[4]["eval_loss"]  # and dense training goes on


@pytest.mark.drill  # minutes of training; `make test-drills` (CI) runs it
def test_run_stopped_after_the_switch_resumes_exactly(reverse_runs, tmp_path):
  cfg, straight, stopped = reverse_runs
  resumed = str(tmp_path / "resumed")
  shutil.copytree(stopped, resumed)
  train_and_evaluate(cfg, resumed)  # restores the dense structure from checkpoint 4
  with open(os.path.join(resumed, "metrics.jsonl")) as f:
    assert '{"step": 4, "event": "resumed"}' in f.read()
  assert _losses(resumed) == _losses(straight)


@pytest.mark.drill  # minutes of training; `make test-drills` (CI) runs it
def test_init_from_dense_checkpoint_projects_and_fine_tunes(reverse_runs, tfds_dir, tmp_path):
  # The stopped run's checkpoint holds dense weights that are exactly Monarch, so projecting
  # them back must reproduce its evaluation exactly.
  _, straight, stopped = reverse_runs
  target = str(tmp_path / "target")
  train_and_evaluate(_test_config(tfds_dir, kind="dense", mlp="monarch", num_steps=3,
                                  eval_every=3, init_from=stopped), target)
  m = _metrics(target)
  assert m[0]["init_from_step"] == 4
  assert m[0]["projection_rel_error"] < 1e-5
  np.testing.assert_allclose(m[0]["eval_loss"], _metrics(straight)[4]["eval_loss"], rtol=1e-5)
  assert m[3]["eval_loss"] < m[0]["eval_loss"]  # and it fine-tunes
  with pytest.raises(FileNotFoundError, match="init_from="):
    train_and_evaluate(_test_config(tfds_dir, init_from=str(tmp_path / "missing")),
                       str(tmp_path / "bad"))


def test_bench_floor_runs_the_layers_matmuls_and_nothing_else():
  """bench_monarch's `dots` floor: XLA counts the same flops as the copy-free layer's
  forward + backward, with no activation copies, and its matmuls are the layer's own."""
  from experiments import bench_monarch  # pylint: disable=g-import-not-at-top
  n_in = n_out = 64
  k, tokens = 4, 256
  w1, w2, x, g = _factors_and_data(n_in, n_out, k, tokens)
  _, layer_flops, _, layer_copies = bench_monarch.compile_case(
      functools.partial(monarch_multiply, out_features=n_out), x, (w1, w2), g)
  _, floor_flops, _, floor_copies = bench_monarch.compile_block_dots(tokens, (w1, w2))
  assert (layer_copies, floor_copies) == (6, 0)
  assert floor_flops == pytest.approx(layer_flops, rel=0.01)
  # Unpermuted, the floor's y blocks are the product with an identity permutation: block l
  # of y is x's block l through w1_l then w2_l.
  x_KTP = x.reshape(tokens, k, n_in // k).transpose(1, 0, 2)
  y_KTS, *_ = bench_monarch.block_dots(x_KTP, jnp.zeros((k, tokens, n_out // k)), w1, w2)
  want = jnp.einsum("ktp,kqp,ksq->kts", x_KTP, w1, w2)
  np.testing.assert_allclose(y_KTS, want, rtol=1e-4, atol=1e-4)
