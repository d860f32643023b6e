"""Fused Monarch kernel (pallas_kernels/monarch): the TPU kernel in the TPU interpreter and the
Mosaic GPU kernels in Mosaic GPU's interpreter (race detector raising; jax >= 0.12, skipped on
older JAX: `make test-kernels-latest` runs them) against the layer's reference, the routing
tables, lowering for TPU and for an abstract H100 (every JAX version), dispatch, errors, and
the LM on monarch_impl=pallas.
"""
import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effjax import config as config_lib
from effjax.config import LinearConfig, ModelConfig
from effjax.layers import monarch as monarch_lib
from effjax.layers.monarch import MonarchLinear, monarch_multiply_reference, monarch_shapes
from effjax.models.decoder_lm import DecoderLM
from effjax.train import step as step_lib
from pallas_kernels import compat
from pallas_kernels.monarch import Blocks, common, default_implementation, monarch
from pallas_kernels.monarch import monarch_reference


def _interpret():
  return compat.tpu_interpret_params(out_of_bounds_reads="raise")


def _gpu_interpret():
  return compat.gpu_interpret_params(detect_races=True, on_race="raise")


needs_gpu_interpreter = pytest.mark.skipif(
    not compat.has_gpu_interpreter(),
    reason=f"Mosaic GPU interpret mode (plgpu.InterpretGPUParams) needs jax >= 0.12, this is "
           f"{jax.__version__}; `make test-kernels-latest` runs these")


def _rel(a, b):
  return float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))


def _data(n_in, n_out, k, tokens):
  w1_shape, w2_shape = monarch_shapes(n_in, n_out, k)
  keys = jax.random.split(jax.random.key(7 * n_in + n_out + k), 4)
  arrays = (jax.random.normal(keys[0], (tokens, n_in)),
            jax.random.normal(keys[1], w1_shape) / np.sqrt(w1_shape[-1]),
            jax.random.normal(keys[2], w2_shape) / np.sqrt(w2_shape[-1]),
            jax.random.normal(keys[3], (tokens, n_out)))
  # bf16-representable, so the bf16 run and the float32 ones see the same values
  return [a.astype(jnp.bfloat16).astype(jnp.float32) for a in arrays]


def _layer_reference(n_out):
  def multiply(x, w1, w2):
    k, _, p = w1.shape
    return monarch_multiply_reference(jnp.pad(x, ((0, 0), (0, k * p - x.shape[1]))), w1,
                                      w2)[:, :n_out]
  return multiply


def _forward_backward(multiply, x, w1, w2, dy):
  y, vjp = jax.vjp(multiply, x, w1, w2)
  return (y,) + vjp(dy.astype(y.dtype))


# (in, out, nblocks): square, expanding, contracting, padded both ways; 24 tokens in blocks of
# 16: two token tiles, the last one padded with zero rows
KERNEL_CASES = [(64, 64, 4), (32, 128, 8), (128, 32, 2), (70, 50, 8)]


@pytest.mark.slow
@pytest.mark.parametrize("n_in, n_out, k", [  # padded case: `make test`; others: drills
    pytest.param(*c, marks=pytest.mark.drill) for c in KERNEL_CASES[:-1]] + [KERNEL_CASES[-1]])
def test_tpu_kernel_equals_the_layer_reference_forward_and_gradients(n_in, n_out, k):
  x, w1, w2, dy = _data(n_in, n_out, k, tokens=24)
  kernel = functools.partial(monarch, out_features=n_out, implementation="tpu",
                             blocks=Blocks(tokens=16), interpret=_interpret())

  @jax.jit
  def runs(x, w1, w2, dy):
    bf16 = [a.astype(jnp.bfloat16) for a in (x, w1, w2)]
    return (_forward_backward(kernel, x, w1, w2, dy),
            _forward_backward(_layer_reference(n_out), x, w1, w2, dy),
            _forward_backward(kernel, *bf16, dy))

  f32, ref, bf16 = runs(x, w1, w2, dy)
  for name, a, b, c in zip(("y", "dx", "dw1", "dw2"), f32, ref, bf16):
    assert a.shape == b.shape and a.dtype == jnp.float32 and c.dtype == jnp.bfloat16, name
    assert float(jnp.linalg.norm(b)) > 0, name
    assert _rel(a, b) < 1e-5, name
    assert _rel(c, b) < 1e-2, name


# (in, out, nblocks) for Mosaic GPU (p, q, s multiples of 64; runs of the permutation
# multiples of 16): square with 4 blocks, padded (127 -> 64 + 64, 255 -> 128 + 128) and
# expanding with 2, contracting with 2, square with 8 (the smallest width 8 blocks allow),
# all bf16, and a small float16 case; 70 tokens: two 64-token tiles, the second mostly zero
# padding (the widest case and the float16 one: one tile)
GPU_CASES = [(256, 256, 4, 70, "bfloat16"), (127, 255, 2, 70, "bfloat16"),
             (256, 128, 2, 70, "bfloat16"), (1024, 1024, 8, 64, "bfloat16"),
             (128, 128, 2, 64, "float16"),
             # GPT-2 small's MLP up projection: runs of 48 channels, 3 x-chunks per block,
             # 12 output chunks; most of a minute in the interpreter: a drill
             pytest.param(768, 3072, 4, 64, "bfloat16", marks=pytest.mark.drill)]


@needs_gpu_interpreter
@pytest.mark.slow
@pytest.mark.parametrize("n_in, n_out, k, tokens, dtype", GPU_CASES)
def test_mosaic_gpu_kernels_equal_the_layer_reference_forward_and_gradients(n_in, n_out, k,
                                                                             tokens, dtype):
  x, w1, w2, dy = _data(n_in, n_out, k, tokens=tokens)
  kernel = functools.partial(monarch, out_features=n_out, implementation="mosaic_gpu",
                             interpret=_gpu_interpret())

  @jax.jit
  def runs(x, w1, w2, dy):
    low = [a.astype(dtype) for a in (x, w1, w2)]
    # float32 reference of the same values (bf16-representable: exactly the kernel's bf16
    # inputs; float16 rounds only values under its normal range, ~6e-5)
    return (_forward_backward(kernel, *low, dy),
            _forward_backward(_layer_reference(n_out), x, w1, w2, dy))

  got, want = runs(x, w1, w2, dy)
  for name, a, b in zip(("y", "dx", "dw1", "dw2"), got, want):
    assert a.shape == b.shape and a.dtype == jnp.dtype(dtype) and b.dtype == jnp.float32, name
    assert float(jnp.linalg.norm(b)) > 0, name
    assert _rel(a, b) < 1e-2, name


def _lower_for_h100(n_in, n_out, k, tokens):
  w1_shape, w2_shape = monarch_shapes(n_in, n_out, k)
  args = (jnp.ones((tokens, n_in), jnp.bfloat16), jnp.ones(w1_shape, jnp.bfloat16),
          jnp.ones(w2_shape, jnp.bfloat16))

  def loss(x, w1, w2):
    return jnp.sum(monarch(x, w1, w2, n_out, implementation="mosaic_gpu").astype(jnp.float32))
  with compat.abstract_gpu():
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()


@pytest.mark.slow
@pytest.mark.parametrize("n_in, n_out", [  # the down projection lowers the same code: a drill
    (768, 3072), pytest.param(3072, 768, marks=pytest.mark.drill)])
def test_mosaic_gpu_kernels_lower_for_an_abstract_h100(n_in, n_out):
  # GPT-2 small's MLP projections, bf16, tokens not a multiple of the 64-token tile
  text = _lower_for_h100(n_in, n_out, 4, tokens=1000)
  # forward, the token-tile backward (dx), and one weight-gradient kernel per factor
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 4
  assert text.count("effjax_monarch_fwd_mosaic_gpu") >= 1
  assert text.count("effjax_monarch_bwd_mosaic_gpu") >= 1
  assert text.count("effjax_monarch_dw2_mosaic_gpu") >= 1
  assert text.count("effjax_monarch_dw1_mosaic_gpu") >= 1
  assert "triton" not in text.lower() and "tpu_custom_call" not in text


@pytest.mark.parametrize("capability, dtype, want", [
    ((9, 0), jnp.bfloat16, "mosaic_gpu"), ((9, 0), jnp.float16, "mosaic_gpu"),
    ((9, 0), None, "mosaic_gpu"), ((9, 0), jnp.float32, "got float32"),
    ((8, 0), jnp.bfloat16, "compute capability 8.0"), ((10, 0), jnp.bfloat16,
                                                       "compute capability 10.0"),
    (None, jnp.bfloat16, "compute capability unknown")],
    ids=["sm90-bf16", "sm90-fp16", "sm90-any", "sm90-f32", "sm80", "sm100", "unknown"])
def test_default_on_a_gpu_is_mosaic_gpu_on_hopper_for_16_bit_only(capability, dtype, want,
                                                                  monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(compat, "cuda_compute_capability", lambda: capability)
  if want == "mosaic_gpu":
    assert default_implementation(dtype=dtype) == "mosaic_gpu"
    return
  with pytest.raises(NotImplementedError, match=re.escape(want)) as error:
    default_implementation(dtype=dtype)
  assert "monarch_impl='xla'" in str(error.value)  # says what to use instead


def test_interpreter_params_pick_their_kernel_family():
  assert default_implementation(interpret=_interpret()) == "tpu"
  if compat.has_gpu_interpreter():
    assert default_implementation(interpret=_gpu_interpret()) == "mosaic_gpu"
  with pytest.raises(NotImplementedError, match=r"with interpret=True"):
    default_implementation(interpret=True)  # no kernel runs in the generic interpreter


def test_mosaic_gpu_refuses_what_it_cannot_run_before_tracing():
  def call(n_in, n_out, k, dtype=jnp.bfloat16, **kwargs):
    w1_shape, w2_shape = monarch_shapes(n_in, n_out, k)
    return monarch(jnp.ones((8, n_in), dtype), jnp.ones(w1_shape, dtype),
                   jnp.ones(w2_shape, dtype), n_out, implementation="mosaic_gpu", **kwargs)
  with pytest.raises(NotImplementedError, match=r"bfloat16/float16, got float32 .*tf32"):
    call(256, 256, 4, jnp.float32)
  with pytest.raises(ValueError, match=r"input block width p=9 must be a multiple of 64"):
    call(70, 50, 8)
  with pytest.raises(ValueError, match=r"output block width s=96 must be a multiple of 64"):
    call(128, 192, 2)
  with pytest.raises(ValueError, match=r"q=512 must be at most 256"):
    call(2048, 2048, 4)
  with pytest.raises(ValueError, match=r"k=8 blocks of q=64 moves runs of \[8\] channels"):
    call(512, 512, 8)
  with pytest.raises(ValueError, match=r"k q = 2048 channels\) and the staging tiles need "
                                       r"\d+ bytes of SMEM, over the 232448"):
    call(2048, 2048, 8)  # the intermediate of 64 tokens alone is 256 KiB
  with pytest.raises(ValueError, match=r"tiles of 64 tokens .* got Blocks.tokens=128"):
    call(256, 256, 4, blocks=Blocks(tokens=128))
  with pytest.raises(ValueError, match=r"only in Mosaic GPU's interpreter.*interpret=True"):
    call(256, 256, 4, interpret=True)
  with pytest.raises(ValueError, match=r"implementation='tpu' takes float32 or bfloat16, got "
                                       r"float16"):
    monarch(jnp.ones((8, 64), jnp.float16), jnp.ones((4, 16, 16), jnp.float16),
            jnp.ones((4, 16, 16), jnp.float16), 64, implementation="tpu", interpret=_interpret())


@pytest.mark.parametrize("n_in, n_out, k", KERNEL_CASES)
def test_kernel_reference_equals_the_layer_reference(n_in, n_out, k):
  x, w1, w2, dy = _data(n_in, n_out, k, tokens=12)

  @jax.jit
  def runs(x, w1, w2, dy):
    return (_forward_backward(functools.partial(monarch_reference, out_features=n_out),
                              x, w1, w2, dy),
            _forward_backward(_layer_reference(n_out), x, w1, w2, dy))
  got, want = runs(x, w1, w2, dy)
  for a, b in zip(got, want):
    assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("k, q", [(4, 16), (4, 13), (8, 7), (3, 10), (2, 1), (1, 5)])
def test_routing_sends_each_channel_where_the_stride_permutation_does(k, q):
  order, routes = common.routing(k, q)
  assert sorted(order.reshape(-1) % q) == sorted(np.tile(np.arange(q), k))
  seen = set()
  for route in routes:
    for i in range(route.count):
      flat = route.j * q + order[route.j, route.offset + i]
      assert (flat % k, flat // k) == (route.l, route.a_start + i)
      seen.add((route.l, route.a_start + i))
  assert seen == {(l, a) for l in range(k) for a in range(q)}  # every channel exactly once
  for j in range(k):  # runs of one block tile its reordered rows in order
    runs = [(r.offset, r.count) for r in routes if r.j == j]
    assert [o for o, _ in runs] == list(np.cumsum([0] + [c for _, c in runs])[:-1])
    assert sum(c for _, c in runs) == q


@pytest.mark.parametrize("n_in, n_out, k", [(768, 3072, 4), (3072, 768, 4), (50, 70, 4)])
def test_work_count_is_the_layer_flops_and_one_pass_over_each_operand(n_in, n_out, k):
  w1_shape, w2_shape = monarch_shapes(n_in, n_out, k)
  params = monarch_lib.monarch_param_count(n_in, n_out, k)
  flops, moved = common.work(1000, n_in, n_out, w1_shape, w2_shape, 2, "forward")
  assert flops == 2 * 1000 * params  # 2 flops per multiply-accumulate per token
  assert moved == 2 * (1000 * (n_in + n_out) + params)  # x, y, the factors: once each (bf16)
  flops, moved = common.work(1000, n_in, n_out, w1_shape, w2_shape, 2, "backward")
  assert 2 * 2 * 1000 * params < flops < 3 * 2 * 1000 * params  # dx, dW + recomputed h
  assert moved == 2 * 1000 * (2 * n_in + n_out) + (2 + 4) * params
  with pytest.raises(ValueError, match="direction must be 'forward' or 'backward', got 'up'"):
    common.work(1, n_in, n_out, w1_shape, w2_shape, 2, "up")


def test_mosaic_gpu_work_count_by_hand():
  # 256 -> 128, 2 blocks: w1 [2, 64, 128], w2 [2, 64, 64]; 128 tokens = two 64-token tiles
  w1_shape, w2_shape = monarch_shapes(256, 128, 2)
  assert (w1_shape, w2_shape) == ((2, 64, 128), (2, 64, 64))
  macs1, macs2 = 2 * 64 * 128, 2 * 64 * 64
  flops, moved = common.work(128, 256, 128, w1_shape, w2_shape, 2, "forward",
                             kernel="mosaic_gpu")
  assert flops == 2 * 128 * (macs1 + macs2)
  assert moved == 2 * 128 * (256 + 128) + 2 * 2 * (macs1 + macs2)  # factors once per tile
  flops, moved = common.work(128, 256, 128, w1_shape, w2_shape, 2, "backward",
                             kernel="mosaic_gpu")
  assert flops == common.work(128, 256, 128, w1_shape, w2_shape, 2, "backward")[0]
  deinterleave = 2 * 2 * 128 * 128  # XLA reads dy and writes it block-major
  data = 2 * 128 * (256 + 128 + 256 + 2 * 2 * 64) + 2 * 2 * (2 * macs1 + macs2)
  dw2 = 2 * (1 * 1) * 2 * 2 * 128 * 64 + 4 * macs2  # 1 x 1 tiles per block, [128, 64] x 2
  dw1 = 2 * (1 * 2) * 2 * 2 * 128 * 64 + 4 * macs1  # 1 x 2 tiles per block
  assert moved == deinterleave + data + dw2 + dw1
  # each backward kernel's own estimate (its CostEstimate): the token-tile kernel's three
  # products (H recomputed, dH, dx) and one product per weight gradient
  assert common.mosaic_gpu_backward_work(128, 256, 128, w1_shape, w2_shape, 2) == {
      "effjax_monarch_bwd_mosaic_gpu": (2 * 128 * (2 * macs1 + macs2), data),
      "effjax_monarch_dw2_mosaic_gpu": (2 * 128 * macs2, dw2),
      "effjax_monarch_dw1_mosaic_gpu": (2 * 128 * macs1, dw1)}
  with pytest.raises(ValueError, match="kernel must be 'tpu' or 'mosaic_gpu', got 'gpu'"):
    common.work(1, 256, 128, w1_shape, w2_shape, 2, "forward", kernel="gpu")


def test_kernels_lower_for_tpu():
  # GPT-2 small's MLP down projection, bf16, tokens not a multiple of the token block
  n_in, n_out, k = 3072, 768, 4
  w1_shape, w2_shape = monarch_shapes(n_in, n_out, k)
  args = (jnp.ones((1000, n_in), jnp.bfloat16), jnp.ones(w1_shape, jnp.bfloat16),
          jnp.ones(w2_shape, jnp.bfloat16))

  def loss(x, w1, w2):
    return jnp.sum(monarch(x, w1, w2, n_out, implementation="tpu").astype(jnp.float32))
  text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(*args).lower(
      lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == 2  # one forward kernel, one backward kernel
  assert "effjax_monarch_fwd_tpu" in text and "effjax_monarch_bwd_tpu" in text


def test_bad_inputs_are_clear_errors():
  x, w1, w2, _ = _data(50, 70, 4, tokens=4)
  with pytest.raises(ValueError, match=r"x \[\.\.\., 50\] -> 80 does not fit factors"):
    monarch(x, w1, w2, 80, implementation="reference")
  with pytest.raises(ValueError, match=r"are not the factors of one Monarch layer"):
    monarch(x, w1, w2[:2], 70, implementation="reference")
  with pytest.raises(ValueError, match=r"must share one dtype.*float32, bfloat16, float32"):
    monarch(x, w1.astype(jnp.bfloat16), w2, 70, implementation="reference")
  with pytest.raises(ValueError, match=r"Blocks.tokens must be a positive multiple of 8, got 12"):
    monarch(x, w1, w2, 70, blocks=Blocks(tokens=12), interpret=_interpret())
  with pytest.raises(ValueError, match=r"implementation 'gpu' is not one of"):
    monarch(x, w1, w2, 70, implementation="gpu")
  if jax.default_backend() != "tpu":
    with pytest.raises(NotImplementedError, match=r"no fused Monarch kernel for platform"):
      monarch(x, w1, w2, 70)
  with pytest.raises(ValueError, match=r"model.linear.monarch_impl='cuda' is not one of"):
    LinearConfig(monarch_impl="cuda")
  with pytest.raises(ValueError, match=r"MonarchLinear: impl='triton' is not one of"):
    MonarchLinear(8, nblocks=2, impl="triton").init(jax.random.key(0), jnp.zeros((1, 8)))


def test_every_monarch_impl_name_is_registered():
  assert set(config_lib.MONARCH_IMPLS) == set(monarch_lib.MONARCH_MULTIPLIES)
  assert LinearConfig().monarch_impl == "xla"


def _use_interpreted_kernel(monkeypatch, family="tpu"):
  """monarch_impl=pallas runs the TPU kernel in the TPU interpreter (8-token blocks, so the
  test batch spans several) or, family="mosaic_gpu", the Mosaic GPU kernels in their
  interpreter with the race detector raising. Returns the (in, out, dtype) it traced."""
  traced = []

  def pallas(x, w1, w2, out_features):
    traced.append((x.shape[-1], out_features, str(x.dtype)))
    if family == "mosaic_gpu":
      return monarch(x, w1, w2, out_features, implementation="mosaic_gpu",
                     interpret=_gpu_interpret())
    return monarch(x, w1, w2, out_features, implementation="tpu", blocks=Blocks(tokens=8),
                   interpret=_interpret())
  monkeypatch.setitem(monarch_lib.MONARCH_MULTIPLIES, "pallas", pallas)
  return traced


def _two_step_losses(base: ModelConfig) -> dict[str, list[float]]:
  """Training losses of two Adam steps of `base` with monarch_impl xla and pallas."""
  tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, 256)
  batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens),
           "positions": jnp.broadcast_to(jnp.arange(9), tokens.shape)}
  tx = optax.adam(1e-2)
  losses = {}
  for impl in ("xla", "pallas"):
    cfg = dataclasses.replace(base, linear=dataclasses.replace(base.linear, monarch_impl=impl))
    model = DecoderLM(cfg)

    @jax.jit
    def init(key, model=model):
      variables = nn.meta.unbox(model.init(key, jnp.zeros((1, 8), jnp.int32)))
      params, model_state = step_lib.split_variables(variables)
      return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 opt_state=tx.init(params), rng=jax.random.key_data(key),
                                 model_state=model_state)

    state = init(jax.random.key(0))
    train_step = jax.jit(step_lib.make_train_step(model, tx, lambda s: 1e-2))
    losses[impl] = []
    for _ in range(2):
      state, metrics = jax.block_until_ready(train_step(state, batch))
      losses[impl].append(float(metrics["train_loss"]))
  assert losses["xla"][-1] < losses["xla"][0]
  return losses


@pytest.mark.drill  # minutes in the interpreter: `make test-drills` (CI runs it)
def test_lm_trains_on_the_kernel_with_the_losses_of_xla(monkeypatch):
  traced = _use_interpreted_kernel(monkeypatch)
  losses = _two_step_losses(ModelConfig(
      vocab_size=300, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, d_ff=48,
      linear=LinearConfig(mlp="monarch", nblocks=4)))
  np.testing.assert_allclose(losses["pallas"], losses["xla"], rtol=1e-5)
  # the three SwiGLU projections (32 -> 48 twice, 48 -> 32) ran on the kernel
  assert {t[:2] for t in traced} == {(32, 48), (48, 32)}


@needs_gpu_interpreter
@pytest.mark.drill  # minutes in the interpreter: `make test-drills` on jax >= 0.12
def test_lm_trains_on_the_mosaic_gpu_kernels_with_the_losses_of_xla(monkeypatch):
  traced = _use_interpreted_kernel(monkeypatch, "mosaic_gpu")
  # bf16 activations (the kernels take 16-bit operands only); widths that fit their tiles
  losses = _two_step_losses(ModelConfig(
      vocab_size=300, d_model=128, num_layers=1, num_heads=4, num_kv_heads=2, d_ff=256,
      dtype="bfloat16", linear=LinearConfig(mlp="monarch", nblocks=2)))
  np.testing.assert_allclose(losses["pallas"], losses["xla"], rtol=1e-2)
  # the three SwiGLU projections (128 -> 256 twice, 256 -> 128) ran on the kernels, in bf16
  assert set(traced) == {(128, 256, "bfloat16"), (256, 128, "bfloat16")}
