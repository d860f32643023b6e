"""pallas_kernels.attention with implementation="mosaic_gpu" (Hopper kernels).

Outputs and all three gradients run in Mosaic GPU's interpreter (simulated SMEM, TMA,
barriers, wgmma) with its race detector raising (tests/test_mosaic_gpu_gmm.py shows that a
racy kernel does raise there), against the float64 reference; that interpreter ships from
jax 0.12, so on older JAX those tests skip (`make test-kernels-latest` runs them). Lowering
for an abstract H100, the implementation choice and the input checks run on every version.
"""
import dataclasses
import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import compat
from pallas_kernels.attention import BlockSizes, attention_reference, default_implementation
from pallas_kernels.attention import flash_attention
from pallas_kernels.attention import api
from pallas_kernels.attention import mosaic_gpu

# ||out - ref|| / ||ref|| of 16-bit inputs with float32 accumulation (fp16 keeps 3 more
# mantissa bits than bf16)
TOL = {"bfloat16": 1e-2, "float16": 2e-3}

needs_interpreter = pytest.mark.skipif(
    not compat.has_gpu_interpreter(),
    reason=f"Mosaic GPU interpret mode (plgpu.InterpretGPUParams) needs jax >= 0.12, this is "
           f"{jax.__version__}; `make test-kernels-latest` runs these")


def _interpret():
  return compat.gpu_interpret_params(detect_races=True, on_race="raise")


@dataclasses.dataclass(frozen=True)
class Case:
  t: int
  n: int
  k: int
  d: int
  s: int | None = None  # key length (default t)
  b: int = 1
  causal: bool = False
  window: int | None = None
  softcap: float | None = None
  segments: bool = False
  dtype: str = "bfloat16"
  # Keys from here on are out of every query's reach (by position) and hold NaN: block
  # skipping must never read them (a masked NaN still poisons p @ V) and their dK/dV are
  # exactly zero.
  unreachable_from: int | None = None

  @property
  def kwargs(self):
    return dict(causal=self.causal, sliding_window=self.window, logit_softcap=self.softcap)


# Every feature and GQA 1/2/4/8, head_dim 64/96/128/256, ragged lengths, both 16-bit types,
# at the default blocks (the forward stacks G heads' rows: G * block_q = 128 or 64; key
# blocks of 128 forward, 64 backward).
CASES = {
    # queries 0..63 see keys 0..63: forward key block 1 (128..255) is never visited
    "causal_gqa2_q64_kv200": Case(t=64, s=200, n=4, k=2, d=64, causal=True,
                                  unreachable_from=128),
    # |i - j| < 40 from queries 0..63 reaches key 102 at most (query padding would reach
    # further: the backward's padded query rows are computed too)
    "window_softcap_fp16_q64_kv150": Case(t=64, s=150, n=2, k=2, d=64, window=40,
                                          softcap=20.0, dtype="float16", unreachable_from=128),
    "segments_causal_window_gqa4_d96_batch2": Case(b=2, t=60, n=4, k=1, d=96, causal=True,
                                                   window=30, segments=True),
    "causal_softcap_gqa8_d256": Case(t=64, n=8, k=1, d=256, causal=True, softcap=10.0),
    "segments_window_gqa1_d128_fp16": Case(t=72, n=2, k=2, d=128, window=50, segments=True,
                                           dtype="float16"),
}


def _inputs(c: Case, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 4)
  s = c.s or c.t
  q = jax.random.normal(keys[0], (c.b, c.t, c.n, c.d), c.dtype)
  k = jax.random.normal(keys[1], (c.b, s, c.k, c.d), c.dtype)
  v = jax.random.normal(keys[2], (c.b, s, c.k, c.d), c.dtype)
  if c.unreachable_from is not None:
    k, v = (x.at[:, c.unreachable_from:].set(jnp.nan) for x in (k, v))
  cot = jax.random.normal(keys[3], (c.b, c.t, c.n, c.d), jnp.float32)
  seg = None
  if c.segments:  # three documents per row, cut at different places per batch row
    seg = (jnp.arange(c.t)[None] * 3 // c.t + jnp.arange(c.b)[:, None] * (
        jnp.arange(c.t)[None] % 7 == 0)).astype(jnp.int32)
  return q, k, v, seg, cot


def _f64(x):
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _reference_value_and_grads(c: Case, q, k, v, seg, cot):
  with jax.enable_x64():
    def loss(q, k, v):
      out = attention_reference(q, k, v, segment_ids_BT=seg, **c.kwargs)
      return jnp.sum(out * _f64(cot)), out
    grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(_f64(q), _f64(k), _f64(v))
    return [np.asarray(x) for x in (out, *grads)]


def _rel(x, ref):
  x, ref = _f64(x), np.asarray(ref, np.float64)
  assert np.isfinite(x).all(), "non-finite values"
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@needs_interpreter
@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_values_and_gradients_in_gpu_interpreter_with_race_detector(case):
  c = CASES[case]
  q, k, v, seg, cot = _inputs(c)

  def loss(q, k, v):
    out = flash_attention(q, k, v, segment_ids=seg, implementation="mosaic_gpu",
                          interpret=_interpret(), **c.kwargs)
    return jnp.sum(out.astype(jnp.float32) * cot), out

  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  reach = slice(0, c.unreachable_from)  # all keys when None
  want = _reference_value_and_grads(c, q, k[:, reach], v[:, reach], seg, cot)
  for name, got, ref, like in zip(("out", "dq", "dk", "dv"), (out, *grads), want,
                                  (q, q, k, v)):
    assert got.shape == like.shape and got.dtype == like.dtype, name
    if name in ("dk", "dv"):
      if c.unreachable_from is not None:  # exactly zero, not NaN
        assert not np.asarray(got[:, c.unreachable_from:]).any(), name
      got = got[:, reach]
    assert _rel(got, ref) < TOL[c.dtype], name


@pytest.mark.slow
def test_lowers_for_an_abstract_h100_without_triton():
  # every feature at once (each adds code to the kernels), default blocks, padded lengths
  c = Case(t=300, n=8, k=2, d=96, causal=True, window=64, softcap=30.0, segments=True)
  q, k, v, seg, cot = _inputs(c)

  def fwd_bwd(q, k, v):
    def loss(q, k, v):
      out = flash_attention(q, k, v, segment_ids=seg, implementation="mosaic_gpu", **c.kwargs)
      return jnp.sum(out.astype(jnp.float32) * cot)
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  with compat.abstract_gpu(), warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    text = jax.jit(fwd_bwd).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 3  # forward, dQ, dK/dV
  assert "triton" not in text.lower()
  assert not [w for w in caught if "Triton" in str(w.message)]


@pytest.mark.parametrize("capability,dtype,want", [
    ((9, 0), jnp.bfloat16, "mosaic_gpu"), ((9, 0), jnp.float16, "mosaic_gpu"),
    ((9, 0), jnp.float32, "gpu"), ((8, 0), jnp.bfloat16, "gpu"), ((10, 0), jnp.bfloat16, "gpu"),
    (None, jnp.bfloat16, "gpu")], ids=["sm90_bf16", "sm90_fp16", "sm90_f32", "sm80", "sm100",
                                       "unknown"])
def test_default_on_a_gpu_is_mosaic_gpu_on_hopper_for_16_bit_inputs(capability, dtype, want,
                                                                   monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(compat, "cuda_compute_capability", lambda: capability)
  assert default_implementation(dtype=dtype) == want


@needs_interpreter
def test_gpu_interpret_params_pick_mosaic_gpu_off_gpu():
  assert default_implementation(interpret=_interpret()) == "mosaic_gpu"
  assert default_implementation(interpret=True) == "gpu"


def test_default_blocks_stack_all_heads_of_a_group_into_wgmma_rows_and_fit_in_smem():
  for groups in (1, 2, 4, 8, 16):
    blocks = api.mosaic_gpu_default_block_sizes(groups, 128)
    assert groups * blocks.block_q == 128 and blocks.block_k == 128, groups
  assert api.mosaic_gpu_default_block_sizes(2, 256).block_q * 2 == 64  # registers at d 256
  assert api.mosaic_gpu_default_block_sizes(3, 64).block_q == 64  # 3 * 64 rows: 64 | 192
  # 192 stacked rows at head_dim 128: with 128-key stages Mosaic GPU's lowering asked for
  # 234520 bytes of shared memory, past the H100's 232448
  assert api.mosaic_gpu_default_block_sizes(3, 128).block_k == 64
  for groups in (1, 2, 3, 4, 6, 8, 16):
    for d in (64, 128):
      b = api.mosaic_gpu_default_block_sizes(groups, d)
      assert mosaic_gpu.smem_bytes(groups, d, b.block_q, b.block_k, *b.bwd) < (
          mosaic_gpu.SMEM_BYTES), (groups, d)


def test_bad_inputs_are_clear_errors_before_any_tracing():
  x = jnp.ones((1, 128, 4, 64), jnp.bfloat16)
  kv = jnp.ones((1, 128, 2, 64), jnp.bfloat16)
  mosaic = functools.partial(flash_attention, implementation="mosaic_gpu")
  with pytest.raises(NotImplementedError, match="bfloat16/float16 inputs, got float32"):
    mosaic(x.astype(jnp.float32), kv.astype(jnp.float32), kv.astype(jnp.float32))
  with pytest.raises(ValueError, match="interpret=True"):
    mosaic(x, kv, kv, interpret=True)
  big = jnp.ones((1, 64, 1, 320), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="head_dim=320"):
    mosaic(big, big, big)
  with pytest.raises(ValueError, match=r"BlockSizes.block_q=24: .*G = 2"):
    mosaic(x, kv, kv, block_sizes=BlockSizes(block_q=24, block_k=64, block_q_bwd=64))
  with pytest.raises(ValueError, match=r"BlockSizes.block_k=96: .*multiple of 64"):
    mosaic(x, kv, kv, block_sizes=BlockSizes(block_q=64, block_k=96, block_q_bwd=64))
  with pytest.raises(ValueError, match=r"BlockSizes.block_q_bwd=32: .*multiple of 64"):
    mosaic(x, kv, kv, block_sizes=BlockSizes(block_q=32, block_k=64))
  odd = jnp.ones((1, 64, 3, 256), jnp.bfloat16)  # G = 3: 192 stacked rows at head_dim 256
  with pytest.raises(NotImplementedError, match="3 query heads per kv head at head_dim 256"):
    mosaic(odd, odd[:, :, :1], odd[:, :, :1])
  assert "mosaic_gpu" in api.IMPLEMENTATIONS


@needs_interpreter
@pytest.mark.drill  # over a minute of interpreted kernels: `EFFJAX_DRILLS=1` runs it
def test_lm_trains_on_the_mosaic_gpu_kernels_like_xla_and_ragged_dot(monkeypatch):
  """A bf16 MoE decoder LM, 3 Adam steps: attention_impl=pallas and gmm_impl=pallas routed to
  the Mosaic GPU kernels in GPU interpret mode give the losses of xla / ragged_dot."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from effjax.config import ModelConfig, MoEConfig  # pylint: disable=g-import-not-at-top
  from effjax.layers import attention as attention_layer  # pylint: disable=g-import-not-at-top
  from effjax.models.decoder_lm import DecoderLM  # pylint: disable=g-import-not-at-top
  from effjax.moe import gmm as gmm_lib  # pylint: disable=g-import-not-at-top
  from effjax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  from pallas_kernels.grouped_matmul import gmm  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(attention_layer, "PALLAS_CPU_INTERPRET", _interpret())
  kernel_calls = []

  def mosaic_gmm(lhs, rhs, group_sizes, group_offset=None):
    kernel_calls.append(lhs.dtype)
    return gmm(lhs, rhs, group_sizes, group_offset=group_offset, implementation="mosaic_gpu",
               interpret=_interpret())

  monkeypatch.setitem(gmm_lib.GMM_IMPLS, "pallas", mosaic_gmm)
  attention_calls = []
  for name in ("forward", "backward"):
    kernel = getattr(mosaic_gpu, name)

    def counted(*args, kernel=kernel, name=name, **kwargs):
      attention_calls.append(name)
      return kernel(*args, **kwargs)

    monkeypatch.setattr(mosaic_gpu, name, counted)
  base = ModelConfig(vocab_size=300, d_model=64, num_layers=1, num_heads=4, num_kv_heads=2,
                     d_ff=64, ffn="moe", moe=MoEConfig(num_experts=4, top_k=2,
                                                       dispatch="dropless"),
                     dtype="bfloat16")
  tokens = jax.random.randint(jax.random.key(2), (2, 41), 0, 256)
  batch = {"tokens": tokens, "segment_ids": jnp.array([[1] * 15 + [2] * 26, [1] * 41]),
           "positions": jnp.array([list(range(15)) + list(range(26)), list(range(41))])}
  tx = optax.adam(1e-2)

  @jax.jit
  def init(key):  # with the xla model: the same parameters, without interpreting kernels
    variables = nn.meta.unbox(DecoderLM(base).init(key, jnp.zeros((1, 8), jnp.int32)))
    params, model_state = step_lib.split_variables(variables)
    return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params), rng=jax.random.key_data(key),
                               model_state=model_state)

  initial = init(jax.random.key(0))
  losses = {}
  for attention_impl, gmm_impl in (("xla", "ragged_dot"), ("pallas", "pallas")):
    cfg = dataclasses.replace(base, attention_impl=attention_impl,
                              moe=dataclasses.replace(base.moe, gmm_impl=gmm_impl))
    train_step = jax.jit(step_lib.make_train_step(DecoderLM(cfg), tx, lambda s: 1e-2))
    state, losses[attention_impl] = initial, []
    for _ in range(3):
      state, metrics = jax.block_until_ready(train_step(state, batch))
      losses[attention_impl].append(float(metrics["train_loss"]))
  assert kernel_calls and set(kernel_calls) == {jnp.dtype(jnp.bfloat16)}  # gmm ran on Mosaic
  assert set(attention_calls) == {"forward", "backward"}  # so did attention (traced once)
  pallas, xla = np.array(losses["pallas"]), np.array(losses["xla"])
  assert np.isfinite(pallas).all() and pallas[-1] < pallas[0]  # it learns
  np.testing.assert_allclose(pallas, xla, rtol=1e-2)  # bf16 activations
