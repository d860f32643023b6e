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
from pallas_kernels.attention import work

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
  gpu_cores: int | None = None  # SMs the dK/dV grid is sized for (None: the H100's 132)

  @property
  def kwargs(self):
    return dict(causal=self.causal, sliding_window=self.window, logit_softcap=self.softcap)


# Every feature and GQA 1/2/4/8, head_dim 64/96/128/256, ragged lengths, both 16-bit types,
# at the default blocks (the forward stacks G heads' rows: G * block_q = 128 or 64; key
# blocks of 128 forward, 64 backward). At these sizes B * K * key blocks is below the SM
# count, so the dK/dV grid splits each key block's items over programs whose float32
# partials XLA sums (test_interpreter_cases_cover_split_and_unsplit_dkv_grids says which).
CASES = {
    # queries 0..63 see keys 0..63: forward key block 1 (128..255) is never visited
    "causal_gqa2_q64_kv200": Case(t=64, s=200, n=4, k=2, d=64, causal=True,
                                  unreachable_from=128),
    # |i - j| < 40 from queries 0..63 reaches key 102 at most (query padding would reach
    # further: the backward's padded query rows are computed too)
    "window_softcap_fp16_q64_kv150": Case(t=64, s=150, n=2, k=2, d=64, window=40,
                                          softcap=20.0, dtype="float16", unreachable_from=128),
    "segments_causal_window_gqa4_d96_batch2": Case(b=2, t=60, n=4, k=1, d=96, causal=True,
                                                   window=30, segments=True, gpu_cores=4),
    # 3 SMs: the key block's 8 items split 3 + 3 + 2
    "causal_softcap_gqa8_d256": Case(t=64, n=8, k=1, d=256, causal=True, softcap=10.0,
                                     gpu_cores=3),
    "segments_window_gqa1_d128_fp16_unsplit": Case(t=72, n=2, k=2, d=128, window=50,
                                                   segments=True, dtype="float16",
                                                   gpu_cores=1),
    # head_dim 72 padded to 80 (wgmma's k step is 16): 32-byte swizzled rows; 96 above: 64
    "causal_gqa2_d72_unsplit": Case(t=64, n=2, k=1, d=72, causal=True, gpu_cores=1),
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
  return q, k, v, _segments(c), cot


def _segments(c: Case):
  if not c.segments:
    return None
  # three documents per row, cut at different places per batch row
  return (np.arange(c.t)[None] * 3 // c.t + np.arange(c.b)[:, None] * (
      np.arange(c.t)[None] % 7 == 0)).astype(np.int32)


def _count(c: Case, seg=None, **kw):
  return work.count_work(implementation="mosaic_gpu", batch=c.b, q_heads=c.n, kv_heads=c.k,
                         q_len=c.t, kv_len=c.s or c.t, head_dim=c.d, causal=c.causal,
                         sliding_window=c.window,
                         segment_ids=None if seg is None else np.asarray(seg), **kw)


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
def test_values_and_gradients_in_gpu_interpreter_with_race_detector(case, monkeypatch):
  c = CASES[case]
  q, k, v, seg, cot = _inputs(c)
  cores = c.gpu_cores or compat.ABSTRACT_H100[1]
  monkeypatch.setattr(compat, "gpu_core_count", lambda: cores)

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
@pytest.mark.parametrize("head_dim, swizzle", [(96, 64), (72, 32)])
def test_lowers_for_an_abstract_h100_without_triton(head_dim, swizzle):
  # every feature at once (each adds code to the kernels), default blocks, padded lengths
  c = Case(t=300, n=8, k=2, d=head_dim, causal=True, window=64, softcap=30.0, segments=True)
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
  # head_dim 96 reaches the kernels unpadded, in 64-byte swizzled SMEM rows; 72 padded to 80
  # (Mosaic GPU finds no SMEM tiling for 72-wide rows), in 32-byte ones
  padded = mosaic_gpu.padded_head_dim(head_dim)
  assert f"x{padded}xbf16>" in text and "x128xbf16>" not in text
  assert f"swizzle<{swizzle}" in text
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


def test_interpreter_cases_cover_split_and_unsplit_dkv_grids():
  splits = {}
  for name, c in CASES.items():
    splits[name] = _count(c, seg=_segments(c), gpu_cores=c.gpu_cores or compat.ABSTRACT_H100[1])[
        "dkv"].grid[-1]
  assert splits == {"causal_gqa2_q64_kv200": 2,  # 8 programs, 6 of them with no item
                    "window_softcap_fp16_q64_kv150": 1,  # one item per key block
                    "segments_causal_window_gqa4_d96_batch2": 2,
                    "causal_softcap_gqa8_d256": 3,
                    "segments_window_gqa1_d128_fp16_unsplit": 1,
                    "causal_gqa2_d72_unsplit": 1}


# Work counts (pallas_kernels.attention.work), from the plans the kernels launch.
def _work(**kw):
  kw = dict(batch=1, q_heads=8, kv_heads=2, q_len=2048, kv_len=2048, head_dim=128) | kw
  return work.count_work(implementation="mosaic_gpu", **kw)


def _launched_grids(jaxpr):
  """(grid names, grid) of every Mosaic GPU kernel in a jaxpr and the jaxprs nested in it, in
  program order."""
  grids = []
  for eqn in jaxpr.eqns:
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if hasattr(sub, "grid_names") and hasattr(sub, "grid"):  # a kernel's mesh
          grids.append((tuple(sub.grid_names), tuple(sub.grid)))
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          grids += _launched_grids(inner)
  return grids


@pytest.mark.slow
@pytest.mark.parametrize("cores", [132, 1], ids=["split_dkv", "one_program_per_key_block"])
def test_counted_grids_are_the_grids_the_call_launches(cores, monkeypatch):
  b, t, n, kv, d = 2, 200 + cores, 4, 2, 32  # a new shape per core count: no cached trace
  monkeypatch.setattr(compat, "gpu_core_count", lambda: cores)
  seg = jnp.repeat(jnp.arange(2, dtype=jnp.int32), t // 2 + 1)[None, :t].repeat(b, 0)
  q, k = jnp.ones((b, t, n, d), jnp.bfloat16), jnp.ones((b, t, kv, d), jnp.bfloat16)

  def loss(q, k, v):
    out = flash_attention(q, k, v, causal=True, segment_ids=seg, implementation="mosaic_gpu")
    return jnp.sum(out.astype(jnp.float32))

  with compat.abstract_gpu():  # and both dK/dV paths lower for an H100
    traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 3
  launched = _launched_grids(traced.jaxpr.jaxpr)
  counted = work.count_work(implementation="mosaic_gpu", batch=b, q_heads=n, kv_heads=kv,
                            q_len=t, kv_len=t, head_dim=d, causal=True,
                            segment_ids=np.asarray(seg), gpu_cores=cores)
  assert launched == [(("b", "h", "q"), counted["forward"].grid),
                      (("b", "h", "q"), counted["dq"].grid),
                      (("b", "h", "k", "split"), counted["dkv"].grid)]
  assert (counted["dkv"].grid[-1] > 1) == (cores > 1)


def test_work_counted_by_hand_on_a_small_causal_case():
  # B = 1, two query heads on one kv head (G = 2), 256 positions, head_dim 64, causal, bf16.
  # Default blocks: forward block_q = 128 / G = 64 and block_k = 128; backward 64 x 64, and
  # dQ's block stays 64 (the stacked default divides it).
  w = _work(q_heads=2, kv_heads=1, q_len=256, kv_len=256, head_dim=64, causal=True)
  kv_block = lambda rows: rows * 64 * 2  # bytes of one [rows, 64] bf16 K or V block
  # Forward: 4 query blocks see 1, 1, 2, 2 key blocks of 128; each item covers both heads.
  fwd = w["forward"]
  assert fwd.grid == (1, 1, 4) and fwd.programs == 4
  assert fwd.blocks_visited == 2 * 6 and fwd.ideal_blocks_visited == 2 * 6
  assert fwd.blocks_masked == 2 * 4  # items on the diagonal: (0,0) (1,0) (2,1) (3,1)
  assert fwd.macs == 2 * 6 * (64 * 128 * 64) * 2  # [64, 128] logits, then P @ V
  assert fwd.kv_bytes == 6 * 2 * kv_block(128)
  q_and_out = 2 * 4 * (2 * 64 * 64 * 2)  # per program: G query blocks in, G out
  assert fwd.bytes_moved == fwd.kv_bytes + q_and_out + 4 * (2 * 64 * 4)  # + lse
  # dQ: 4 query blocks see 1..4 key blocks of 64 (10 items); masked only on the diagonal.
  dq = w["dq"]
  assert dq.grid == (1, 1, 4) and dq.blocks_visited == 2 * 10 and dq.blocks_masked == 2 * 4
  assert dq.kv_bytes == 10 * 2 * kv_block(64) and dq.macs == 2 * 10 * (64 * 64 * 64) * 3
  # dK/dV: 4 key blocks, B * K * 4 = 4 programs < 132 SMs: 8 splits each (at most one per
  # (head, query block) item); key block j has 2 * (4 - j) items, one per split, so 32
  # programs do 20 items and each loads its K/V block (16 KB) once.
  dkv = w["dkv"]
  assert dkv.grid == (1, 1, 4, 8) and dkv.programs == 32
  assert dkv.blocks_visited == 20 and dkv.blocks_masked == 2 * 4
  assert dkv.macs == 20 * (64 * 64 * 64) * 4
  assert dkv.kv_bytes == 32 * 2 * kv_block(64)
  rows_per_item = 2 * (64 * 64 * 2) + 2 * 64 * 4  # Q and dO rows, lse and delta
  partials = 32 * 2 * (64 * 64 * 4)  # float32 dK and dV per program
  assert dkv.bytes_moved == dkv.kv_bytes + 20 * rows_per_item + partials
  for x in w.values():
    assert x.ideal_kv_bytes == 2 * kv_block(256)


def test_kv_bytes_do_not_grow_with_group_size_at_a_fixed_query_block():
  # One K/V block per kv group and query block, whatever G: GQA 1/2/4/8 at 2 kv heads. (The
  # default blocks keep G * block_q = 128 rows, one warpgroup's registers, so there block_q
  # shrinks as 128 / G and the query blocks, each walking the keys, grow with G; dQ always
  # runs with that stacked block where it divides block_q_bwd, so it is fixed only up to
  # G = 2 at block_q_bwd = 64.)
  blocks = BlockSizes(block_q=64, block_k=128, block_q_bwd=64, block_k_bwd=64)
  for kernel, groups in (("forward", (1, 2, 4, 8)), ("dq", (1, 2))):
    counts = {g: _work(q_heads=2 * g, causal=True, block_sizes=blocks)[kernel] for g in groups}
    assert len({w.kv_bytes for w in counts.values()}) == 1, (
        kernel, {g: w.kv_bytes for g, w in counts.items()})
    for g, w in counts.items():  # while the query side grows with G as it must
      assert w.macs == g * counts[1].macs and w.ideal_kv_bytes == counts[1].ideal_kv_bytes


def test_causal_block_skipping_halves_the_macs_as_the_ideal_does():
  for g in (1, 4):
    full, causal = _work(q_heads=2 * g), _work(q_heads=2 * g, causal=True)
    for kernel in work.KERNELS:
      f, c = full[kernel], causal[kernel]
      assert f.macs == f.ideal_macs  # block multiples, head_dim 128: nothing wasted
      counted, ideal = c.macs / f.macs, c.ideal_macs / f.ideal_macs
      # only the blocks the diagonal crosses are extra: at most block_k / (2 T) more
      block_k = 128 if kernel == "forward" else 64
      assert ideal < counted <= 0.5 + block_k / (2 * 2048), (g, kernel, counted, ideal)


def test_dkv_grid_fills_the_sms_at_batch_one():
  kw = dict(q_heads=8, kv_heads=1, causal=True)
  split = _work(**kw)["dkv"]
  alone = _work(**kw, gpu_cores=16)["dkv"]  # 32 key blocks of 64 already cover 16 SMs
  assert split.programs >= 132 and alone.programs == 32 and alone.grid[-1] == 1
  # Splitting changes who does the work, not how much; each split reloads its K/V block.
  assert split.macs == alone.macs and split.blocks_visited == alone.blocks_visited
  assert split.kv_bytes == split.grid[-1] * alone.kv_bytes


def test_head_dim_is_padded_in_memory_only_to_a_multiple_of_16():
  # head_dim 96 runs unpadded (64-byte swizzled rows): 3/4 of 128's MACs and K/V bytes at the
  # same blocks; 72 is padded to 80 (wgmma's k step) and counted at 80.
  assert [mosaic_gpu.padded_head_dim(d) for d in (72, 80, 96, 112, 128)] == [80, 80, 96, 112,
                                                                              128]
  w72, w80, w96, w128 = (_work(head_dim=d) for d in (72, 80, 96, 128))
  for kernel in work.KERNELS:
    assert w96[kernel].kv_bytes * 4 == w128[kernel].kv_bytes * 3
    assert w96[kernel].macs * 4 == w128[kernel].macs * 3
    assert (w72[kernel].kv_bytes, w72[kernel].macs) == (w80[kernel].kv_bytes, w80[kernel].macs)
    assert w72[kernel].ideal_kv_bytes * 10 == w80[kernel].ideal_kv_bytes * 9
