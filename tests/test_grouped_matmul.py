"""pallas_kernels.grouped_matmul: every implementation against the reference, the reference
against a float64 numpy loop over groups.

GPU (Triton-style) kernels run under Pallas's generic interpreter, TPU (Mosaic) kernels under
the TPU simulator with out-of-bounds reads raising; both also lower for their real platform.
Errors are ||out - ref|| / ||ref||; rows past the sum of the group sizes hold NaN in lhs, so a
kernel that reads them into a kept row, or lets them leak through a masked product, fails.
"""
import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import compat
from pallas_kernels.grouped_matmul import Tiles, Tiling, default_implementation, gmm, tgmm
from pallas_kernels.grouped_matmul import api
from pallas_kernels.grouped_matmul import common
from pallas_kernels.grouped_matmul import GPU_TILING, MOSAIC_GPU_TILING, TPU_TILING
from pallas_kernels.grouped_matmul import mosaic_gpu
from pallas_kernels.grouped_matmul import work

F32_TOL, BF16_TOL = 1e-5, 1e-2
SMALL = Tiling(fwd=Tiles(16, 16, 16), dlhs=Tiles(32, 16, 16), drhs=Tiles(16, 16, 32))


def _tpu_simulator():
  return compat.tpu_interpret_params(out_of_bounds_reads="raise")


# Implementation name -> interpret argument. Ids avoid the bare words "gpu"/"tpu" (conftest).
KERNELS = {"gpu": True, "tpu": _tpu_simulator()}
KERNEL_IDS = {"gpu": "triton_style", "tpu": "mosaic"}


def _implementations(*names):
  """pytest params; the interpreted kernels are marked slow (seconds each, like attention's)."""
  return [pytest.param(name, id=KERNEL_IDS.get(name, name),
                       marks=[pytest.mark.slow] if name in KERNELS else [])
          for name in names]


@dataclasses.dataclass(frozen=True)
class Case:
  m: int
  k: int
  n: int
  sizes: tuple[int, ...]
  dtype: str = "float32"
  transpose_rhs: bool = False


def _random_sizes(seed, m, num_groups):
  return tuple(int(s) for s in np.random.default_rng(seed).multinomial(m, [1 / num_groups] *
                                                                        num_groups))


CASES = {
    # empty groups (first, middle, last), boundaries inside 16-row tiles, sum 53 < m = 64
    "ragged_empty_tail": Case(m=64, k=40, n=24, sizes=(0, 7, 0, 20, 3, 23, 0)),
    # every row in one group; bf16; weights stored [G, n, k]
    "one_group_bf16_t": Case(m=48, k=48, n=40, sizes=(0, 0, 48, 0), dtype="bfloat16",
                             transpose_rhs=True),
    # m, k, n off tile multiples; random multinomial sizes summing to m
    "random_odd_shapes": Case(m=37, k=24, n=44, sizes=_random_sizes(3, 37, 3)),
}


def _inputs(c: Case, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  dtype = jnp.dtype(c.dtype)
  num_groups = len(c.sizes)
  lhs = jax.random.normal(keys[0], (c.m, c.k), jnp.float32)
  lhs = lhs.at[sum(c.sizes):].set(jnp.nan).astype(dtype)  # rows in no group must not matter
  rhs_shape = (num_groups, c.n, c.k) if c.transpose_rhs else (num_groups, c.k, c.n)
  rhs = jax.random.normal(keys[1], rhs_shape, dtype)
  cot = jax.random.normal(keys[2], (c.m, c.n), jnp.float32)  # not all-ones: mixes rows
  return lhs, rhs, jnp.array(c.sizes, jnp.int32), cot


def _rel(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  assert np.isfinite(x).all(), "non-finite values"
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _numpy_loop(lhs, rhs, sizes, cot, transpose_rhs):
  """out, dlhs, drhs of sum(out * cot) by a float64 loop over groups (rows past the sum: 0)."""
  lhs, rhs, cot = (np.asarray(x, np.float64) for x in (lhs, rhs, cot))
  w = np.swapaxes(rhs, 1, 2) if transpose_rhs else rhs  # [G, k, n]
  out, dlhs, dw = np.zeros((lhs.shape[0], w.shape[2])), np.zeros(lhs.shape), np.zeros(w.shape)
  start = 0
  for g, size in enumerate(sizes):
    rows = slice(start, start + size)
    out[rows] = lhs[rows] @ w[g]
    dlhs[rows] = cot[rows] @ w[g].T
    dw[g] = lhs[rows].T @ cot[rows]
    start += size
  return out, dlhs, (np.swapaxes(dw, 1, 2) if transpose_rhs else dw)


def _gmm_and_grads(lhs, rhs, sizes, cot, **kwargs):
  """out, dlhs, drhs of sum(out * cot), compiled as one program (eager op-by-op dispatch is
  several times slower); `sizes` stays a constant, so host-side checks still see its values."""
  def loss(lhs, rhs):
    out = gmm(lhs, rhs, sizes, **kwargs)
    return jnp.sum(out.astype(jnp.float32) * cot), out
  (dlhs, drhs), out = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(lhs, rhs)
  return out, dlhs, drhs


@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_reference_matches_float64_numpy_loop(case):
  c = CASES[case]
  lhs, rhs, sizes, cot = _inputs(c)
  lhs = lhs.at[sum(c.sizes):].set(0.0)  # numpy's 0 * NaN would be NaN in dlhs of tail rows
  lhs32, rhs32 = lhs.astype(jnp.float32), rhs.astype(jnp.float32)
  got = _gmm_and_grads(lhs32, rhs32, sizes, cot, transpose_rhs=c.transpose_rhs,
                       implementation="reference")
  want = _numpy_loop(lhs32, rhs32, c.sizes, cot, c.transpose_rhs)
  for name, g, w in zip(("out", "dlhs", "drhs"), got, want):
    assert g.shape == w.shape, name
    assert _rel(g, w) < F32_TOL, name
  assert not np.asarray(got[0][sum(c.sizes):]).any()  # rows past the sum are exactly zero
  for g, size in enumerate(c.sizes):  # empty groups get exactly zero weight gradient
    assert size or not np.asarray(got[2][g]).any()


def _check_against_reference(c: Case, implementation: str, interpret, tiling=SMALL):
  lhs, rhs, sizes, cot = _inputs(c)
  kwargs = dict(transpose_rhs=c.transpose_rhs)
  out, dlhs, drhs = _gmm_and_grads(lhs, rhs, sizes, cot, implementation=implementation,
                                   interpret=interpret, tiling=tiling, **kwargs)
  ref = _gmm_and_grads(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes, cot,
                       implementation="reference", **kwargs)
  tol = F32_TOL if c.dtype == "float32" else BF16_TOL
  for name, x, dtype, r in zip(("out", "dlhs", "drhs"), (out, dlhs, drhs),
                               (lhs.dtype, lhs.dtype, rhs.dtype), ref):
    assert x.shape == r.shape and x.dtype == dtype, name
    assert _rel(x, r) < tol, name
  return out, dlhs, drhs


# The TPU simulator is slow: off-multiple shapes reach it through the sharded test instead.
IMPLEMENTATION_CASES = [
    pytest.param(impl, case, id=f"{KERNEL_IDS.get(impl, impl)}-{case}",
                 marks=[pytest.mark.slow] if impl in KERNELS else [])
    for impl in ("gpu", "tpu", "ragged_dot") for case in CASES
    if not (impl == "tpu" and case == "random_odd_shapes")]


@pytest.mark.parametrize("implementation,case", IMPLEMENTATION_CASES)
def test_implementation_matches_reference_forward_and_gradients(implementation, case):
  _check_against_reference(CASES[case], implementation, KERNELS.get(implementation, False))


@pytest.mark.parametrize("implementation",
                         _implementations("reference", "ragged_dot", "gpu", "tpu"))
def test_group_offset_shards_sum_to_the_full_product(implementation):
  c = Case(m=45, k=24, n=40, sizes=(9, 0, 14, 6, 3, 8))
  lhs, rhs, sizes, cot = _inputs(c)  # sum 40 < 45: a NaN tail
  interpret = KERNELS.get(implementation, False)
  full = _gmm_and_grads(lhs, rhs, sizes, cot, implementation="reference")
  # One jitted function for all shards: the offset is traced, so it compiles once.
  shard = jax.jit(lambda lhs, rhs, offset: _gmm_and_grads(
      lhs, rhs, sizes, cot, group_offset=offset, implementation=implementation,
      interpret=interpret, tiling=SMALL))
  outs, dlhss, drhss = zip(*[shard(lhs, rhs[o:o + 2], jnp.int32(o)) for o in (0, 2, 4)])
  assert _rel(sum(outs), full[0]) < F32_TOL
  assert _rel(sum(dlhss), full[1]) < F32_TOL
  assert _rel(jnp.concatenate(drhss), full[2]) < F32_TOL
  # each shard is zero outside its own rows: shard 1 owns groups 2, 3 = rows 9 .. 28
  assert not np.asarray(outs[1][:9]).any() and not np.asarray(outs[1][29:]).any()
  assert np.abs(np.asarray(outs[1][9:29])).min(axis=1).max() > 0


@pytest.mark.parametrize("implementation",
                         _implementations("reference", "ragged_dot", "gpu", "tpu"))
def test_traced_sizes_past_m_are_truncated_at_m(implementation):
  # 10 + 30 + 20 = 60 > m = 40: group 1 is cut at row 40, group 2 is empty. Traced, so no
  # error can be raised; nothing past lhs may be read (the TPU simulator raises if it is).
  c = Case(m=40, k=16, n=24, sizes=(10, 30, 20))
  lhs, rhs, _, cot = _inputs(c)
  lhs = jnp.nan_to_num(lhs)
  interpret = KERNELS.get(implementation, False)
  fn = jax.jit(lambda lhs, rhs, sizes: _gmm_and_grads(
      lhs, rhs, sizes, cot, implementation=implementation, interpret=interpret,
      tiling=Tiling(Tiles(16, 16, 16))))
  got = fn(lhs, rhs, jnp.array([10, 30, 20], jnp.int32))
  want = _numpy_loop(lhs, rhs, (10, 30, 0), cot, transpose_rhs=False)
  for name, g, w in zip(("out", "dlhs", "drhs"), got, want):
    assert _rel(g, w) < F32_TOL, name


@pytest.mark.parametrize("implementation", _implementations("gpu", "tpu"))
def test_tgmm_alone_matches_reference_with_nan_past_the_sum(implementation):
  c = CASES["ragged_empty_tail"]
  lhs, _, sizes, cot = _inputs(c)
  grad = cot.at[sum(c.sizes):].set(jnp.inf)  # neither operand's unused rows may leak
  got = tgmm(lhs, grad, sizes, implementation=implementation,
             interpret=KERNELS[implementation], tiling=SMALL)
  want = tgmm(lhs, grad, sizes, implementation="reference")
  assert got.shape == (len(c.sizes), c.k, c.n)
  assert _rel(got, want) < F32_TOL
  assert not np.asarray(got[jnp.array(c.sizes) == 0]).any()  # empty groups: exactly zero


@pytest.mark.slow
def test_preferred_element_type_sets_the_output_dtype_and_keeps_input_dtypes_for_gradients():
  c = Case(m=32, k=16, n=16, sizes=(5, 20, 7), dtype="bfloat16")
  lhs, rhs, sizes, cot = _inputs(c)
  out, dlhs, drhs = _gmm_and_grads(lhs, rhs, sizes, cot, preferred_element_type=jnp.float32,
                                   implementation="gpu", interpret=True, tiling=SMALL)
  assert (out.dtype, dlhs.dtype, drhs.dtype) == (jnp.float32, jnp.bfloat16, jnp.bfloat16)
  # float32 output of bf16 operands: only the operands' rounding, no output rounding
  want = _numpy_loop(lhs.astype(jnp.float32), rhs.astype(jnp.float32), c.sizes, cot, False)
  assert _rel(out, want[0]) < F32_TOL


def test_visit_schedule_visits_each_group_tile_pair_once_in_row_order():
  # Rows [0, 5), [5, 5) (empty), [5, 40) in 16-row tiles: 3 tiles, 3 segments.
  starts, ends = jnp.array([0, 5, 5]), jnp.array([5, 5, 40])
  seg, tile, count = common.visit_schedule(starts, ends, 16, 3, visit_empty=False)
  assert int(count[0]) == 4 and seg.shape == (5,)  # static bound: 3 tiles + 3 segments - 1
  assert list(zip(seg.tolist(), tile.tolist())) == [(0, 0), (2, 0), (2, 1), (2, 2), (2, 2)]
  seg, tile, count = common.visit_schedule(starts, ends, 16, 3, visit_empty=True)
  assert int(count[0]) == 5
  assert list(zip(seg.tolist(), tile.tolist())) == [(0, 0), (1, 0), (2, 0), (2, 1), (2, 2)]
  first, stop = common.tile_group_range(starts, ends, 16, 3)
  assert first.tolist() == [0, 2, 2] and stop.tolist() == [3, 3, 3]


def test_visit_schedule_bound_holds_for_random_sizes():
  # Every (nonempty group, tile it touches) pair and one visit per empty group, nothing else,
  # within the static bound; 6 groups over 64 rows in 8-row tiles, many of them empty.
  num_groups, block_m, m = 6, 8, 64
  schedule = jax.jit(lambda starts, ends: common.visit_schedule(
      starts, ends, block_m, m // block_m, visit_empty=True))
  rng = np.random.default_rng(0)
  for _ in range(40):
    sizes = rng.multinomial(int(rng.integers(0, m + 1)), rng.dirichlet([0.3] * num_groups))
    ends = np.cumsum(sizes)
    starts = ends - sizes
    seg, tile, count = (np.asarray(x) for x in schedule(jnp.asarray(starts, jnp.int32),
                                                        jnp.asarray(ends, jnp.int32)))
    visits = list(zip(seg[:count[0]].tolist(), tile[:count[0]].tolist()))
    want = sorted({(g, t) for g in range(num_groups) for t in range(m // block_m)
                   if starts[g] < (t + 1) * block_m and ends[g] > t * block_m} |
                  {(g, min(starts[g] // block_m, m // block_m - 1)) for g in range(num_groups)
                   if not sizes[g]})
    assert visits == want, sizes  # in row order, each pair once
    assert seg.shape == (m // block_m + num_groups - 1,)


@pytest.mark.parametrize("platform", ["cuda", "tpu"], ids=["to_cuda", "to_tpu"])
def test_kernels_lower_for_their_platform(platform, monkeypatch):
  # Off-multiple sizes (padded in every axis), default tiles, bf16, both weight layouts.
  m, k, n, num_groups = 1300, 1000, 700, 6  # 11 row tiles, 6 groups: no power of two
  lhs = jnp.ones((m, k), jnp.bfloat16)
  rhs = jnp.ones((num_groups, k, n), jnp.bfloat16)
  sizes = jnp.full((num_groups,), 200, jnp.int32)
  implementation = "gpu" if platform == "cuda" else "tpu"

  def fwd_bwd(lhs, rhs, rhs_t, sizes):
    def loss(lhs, rhs, rhs_t):
      out = gmm(lhs, rhs, sizes, implementation=implementation)
      out_t = gmm(lhs, rhs_t, sizes, transpose_rhs=True, implementation=implementation,
                  group_offset=jnp.int32(0))
      return jnp.sum(out.astype(jnp.float32)) + jnp.sum(out_t.astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(lhs, rhs, rhs_t)

  rhs_t = jnp.swapaxes(rhs, 1, 2)
  lower = lambda: jax.jit(fwd_bwd).trace(lhs, rhs, rhs_t, sizes).lower(
      lowering_platforms=(platform,)).as_text()
  if platform == "cuda":
    # No GPU here: JAX >= 0.11 lowers Pallas GPU kernels only for an abstract device.
    monkeypatch.setattr(compat, "_triton_noted", False)
    with compat.abstract_gpu(), pytest.warns(FutureWarning, match="Triton backend"):
      text = lower()
  else:
    text = lower()
  kernel_calls = text.count("triton") if platform == "cuda" else text.count("tpu_custom_call")
  assert kernel_calls >= 6  # gmm, dlhs, tgmm for each layout


def test_triton_use_is_said_once_and_jax_warnings_are_not_silenced(monkeypatch):
  monkeypatch.setattr(compat, "_triton_noted", False)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    compat.note_triton_use()
    compat.note_triton_use()
  notices = [w for w in caught if issubclass(w.category, FutureWarning)]
  assert len(notices) == 1 and "implementation='mosaic_gpu'" in str(notices[0].message)
  # JAX's own deprecation message stays visible: no filter for it anywhere in the process
  assert not [f for f in warnings.filters
              if f[1] is not None and "Triton backend is deprecated" in f[1].pattern]


def test_bad_inputs_are_clear_errors():
  lhs, rhs = jnp.ones((16, 8)), jnp.ones((3, 8, 4))
  sizes = jnp.array([4, 4, 4], jnp.int32)
  with pytest.raises(ValueError, match="group_sizes must be an int32 array, got int8"):
    gmm(lhs, rhs, sizes.astype(jnp.int8))
  with pytest.raises(ValueError, match=r"group_sizes must be 1-D \[num_groups\], got shape"):
    gmm(lhs, rhs, sizes[None])
  with pytest.raises(ValueError, match=r"rhs \(3, 8, 4\), read as \[G, n, k\].* has k=4"):
    gmm(lhs, rhs, sizes, transpose_rhs=True)
  with pytest.raises(ValueError, match=r"lhs must be \[m, k\]"):
    gmm(lhs[None], rhs, sizes)
  with pytest.raises(ValueError, match="group_sizes has 2 groups but the weights have 3"):
    gmm(lhs, rhs, sizes[:2])
  with pytest.raises(ValueError, match="group_sizes sum to 20, more than the 16 rows"):
    gmm(lhs, rhs, jnp.array([4, 8, 8], jnp.int32))
  with pytest.raises(ValueError, match="group_sizes must be >= 0, got -1 at group 1"):
    gmm(lhs, rhs, jnp.array([4, -1, 8], jnp.int32))
  with pytest.raises(ValueError, match="lhs must be one of float32/bfloat16/float16, got int32"):
    gmm(lhs.astype(jnp.int32), rhs.astype(jnp.int32), sizes)
  with pytest.raises(ValueError, match="share one dtype, got float32 and bfloat16"):
    gmm(lhs, rhs.astype(jnp.bfloat16), sizes)
  with pytest.raises(ValueError, match="group_offset=2 with 3 local groups needs"):
    gmm(lhs, rhs, jnp.array([1, 1, 1, 1], jnp.int32), group_offset=2)
  with pytest.raises(ValueError, match="group_offset must be an int32 scalar"):
    gmm(lhs, rhs, sizes, group_offset=jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match="tgmm with group_offset needs num_groups"):
    tgmm(lhs, lhs, sizes, group_offset=0)
  with pytest.raises(ValueError, match="GPU tiles must be powers of two >= 16.*block_k=24"):
    gmm(lhs, rhs, sizes, implementation="gpu", interpret=True,
        tiling=Tiling(Tiles(16, 24, 16)))
  with pytest.raises(ValueError, match="Tiles.block_n=64 tiles a TPU lane axis of size 200"):
    gmm(lhs, jnp.ones((3, 8, 200)), sizes, implementation="tpu",
        tiling=Tiling(Tiles(16, 16, 64)))
  with pytest.raises(ValueError, match="implementation='cuda' is not one of"):
    gmm(lhs, rhs, sizes, implementation="cuda")


def test_empty_shapes_give_zeros_and_zero_gradients():
  rhs = jnp.ones((2, 8, 4))
  out = gmm(jnp.ones((0, 8)), rhs, jnp.zeros((2,), jnp.int32), implementation="gpu",
            interpret=True)
  assert out.shape == (0, 4)
  lhs = jnp.ones((6, 0))
  grads = jax.grad(lambda l, r: gmm(l, r, jnp.array([3, 3], jnp.int32)).sum(),
                   argnums=(0, 1))(lhs, jnp.ones((2, 0, 4)))
  assert [g.shape for g in grads] == [(6, 0), (2, 0, 4)]
  assert tgmm(jnp.ones((6, 5)), jnp.ones((6, 4)), jnp.zeros((3,), jnp.int32)).shape == (3, 5, 4)
  assert not tgmm(jnp.ones((6, 5)), jnp.ones((6, 4)), jnp.zeros((3,), jnp.int32)).any()


def test_platform_selection_on_cpu():
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU choice")
  assert default_implementation() == "reference"
  assert default_implementation(interpret=True) == "gpu"
  assert default_implementation(interpret=_tpu_simulator()) == "tpu"


# ------------------------------------------------------------- work items and counts (no timing)

def test_row_chunks_own_every_row_once_and_issue_under_min_rows_extra_per_segment():
  rng = np.random.default_rng(0)
  for block_m, min_rows, tiles in ((64, 16, 3), (32, 8, 2)):
    num_rows = block_m * tiles
    chunks = jax.jit(lambda s, e, block_m=block_m, min_rows=min_rows, num_rows=num_rows:
                     common.row_chunks(s, e, block_m=block_m, min_rows=min_rows,
                                       num_rows=num_rows))
    for _ in range(15):
      cuts = np.sort(rng.integers(0, num_rows + 1, size=7))  # 6 segments, some empty
      starts, ends = cuts[:-1], cuts[1:]
      c = jax.tree.map(np.asarray, chunks(jnp.asarray(starts, jnp.int32),
                                          jnp.asarray(ends, jnp.int32)))
      count = int(c.num_items[0])
      assert count <= c.max_items
      owned = np.zeros(num_rows, int)
      issued = np.zeros(len(starts), int)
      for i in range(count):
        seg, row0, lo, hi = (int(a[i]) for a in (c.segment, c.row0, c.lo, c.hi))
        rows = c.sizes[int(c.size_class[i])]
        assert 0 <= row0 <= lo <= hi <= row0 + rows <= num_rows  # no read past the rows
        assert starts[seg] <= lo and hi <= ends[seg]  # owns only its segment's rows
        owned[lo:hi] += 1
        issued[seg] += rows
      want = np.zeros(num_rows, int)
      for s, e in zip(starts, ends):
        want[s:e] = 1
      assert (owned == want).all(), cuts  # every row of every segment owned exactly once
      assert ((issued - (ends - starts)) < min_rows).all(), cuts


def test_aligned_segment_chunks_start_at_multiples_and_own_every_row_once():
  # Mosaic GPU gmm's items: chunks start at multiples of 8 rows (its TMA loads of swizzled
  # tiles need that), every row of [0, num_rows) is owned once (rows outside the groups by
  # the zero segments 0 and G + 1), and a group issues its rows rounded out to multiples of 8.
  rng = np.random.default_rng(1)
  num_rows, block_m, align = 256, 64, 8
  chunks = jax.jit(lambda s, e: common.segment_row_chunks(
      s, e, num_rows=num_rows, block_m=block_m, min_rows=align, align=align))
  for _ in range(15):
    cuts = np.sort(rng.integers(0, num_rows - 20, size=6))  # 5 groups, some empty; rows after
    starts, ends = cuts[:-1], cuts[1:]
    c = jax.tree.map(np.asarray, chunks(jnp.asarray(starts, jnp.int32),
                                        jnp.asarray(ends, jnp.int32)))
    seg_starts = np.concatenate([[0], starts, ends[-1:]])
    seg_ends = np.concatenate([starts[:1], ends, [num_rows]])
    owned, issued = np.zeros(num_rows, int), np.zeros(len(seg_starts), int)
    for i in range(int(c.num_items[0])):
      seg, row0, lo, hi = (int(a[i]) for a in (c.segment, c.row0, c.lo, c.hi))
      rows = c.sizes[int(c.size_class[i])]
      assert row0 % align == 0 and 0 <= row0 <= lo <= hi <= row0 + rows <= num_rows
      assert seg_starts[seg] <= lo and hi <= seg_ends[seg]
      owned[lo:hi] += 1
      issued[seg] += rows
    assert (owned == 1).all(), cuts
    want = [(-(-e // align) - s // align) * align if e > s else 0
            for s, e in zip(seg_starts, seg_ends)]
    np.testing.assert_array_equal(issued, want, err_msg=str(cuts))
  with pytest.raises(ValueError, match="align must be a power of two dividing min_rows=8, got 3"):
    common.segment_row_chunks(jnp.zeros(2, jnp.int32), jnp.ones(2, jnp.int32), num_rows=64,
                              block_m=64, min_rows=8, align=3)


def test_mosaic_gpu_tgmm_spans_cover_each_group_from_aligned_starts():
  # Mosaic GPU tgmm contracts each group over one span: starting at a multiple of 8 rows (the
  # TMA of a swizzled tile), a multiple of 16 rows long (wgmma's k step), inside [0, m), no
  # more than the group rounded out to 8 rows plus 8; empty groups contract nothing.
  rng = np.random.default_rng(2)
  m = 256
  for _ in range(20):
    cuts = np.sort(rng.integers(0, m + 1, size=7))
    starts, ends = cuts[:-1].astype(np.int32), cuts[1:].astype(np.int32)
    first, rows = map(np.asarray, mosaic_gpu.tgmm_spans(starts, ends, m=m))
    for s, e, f, r in zip(starts, ends, first, rows):
      if e == s:
        assert r == 0
        continue
      assert f % 8 == 0 and r % 16 == 0 and 0 <= f <= s and e <= f + r <= m, (s, e, f, r)
      assert r <= -(-e // 8) * 8 - s // 8 * 8 + 8, (s, e, f, r)
    assert [int(mosaic_gpu.tgmm_steps(r, 64)) for r in (0, 16, 48, 64, 112, 128)] == [
        0, 1, 2, 1, 3, 2]  # 64-row tiles, then 32 and 16 rows
  # a row tile that is not a power of two (192): the rest still splits into its set bits
  assert mosaic_gpu.tgmm_chunk_sizes(192) == (128, 64, 32, 16)
  assert int(mosaic_gpu.tgmm_steps(192 + 176, 192)) == 4  # 192, then 128 + 32 + 16


def _rows_tgmm_mosaic_gpu(sizes):
  """Rows Mosaic GPU tgmm contracts: each nonempty group from its start rounded down to 8 to
  its end rounded up to 8, that length rounded up to 16."""
  sizes = np.asarray(sizes, np.int64)
  ends = np.cumsum(sizes)
  return sum(-(-(-(-e // 8) * 8 - s // 8 * 8) // 16) * 16
             for s, e in zip(ends - sizes, ends) if e > s)


def _rows_chunked_gpu(sizes, block_m, min_rows=16):
  """Rows the Triton kernels issue: full chunks, then the tail rounded up to min_rows."""
  sizes = [int(s) for s in sizes]
  return sum(s // block_m * block_m + -(-(s % block_m) // min_rows) * min_rows for s in sizes)


def _rows_rounded_out(sizes, unit):
  """Each nonempty group's rows [s, e) rounded out to multiples of unit: what a kernel issues
  when it multiplies whole unit-row blocks per group (TPU: unit = the sublane granularity; the
  row tiles are multiples of it, so splitting a group at tile edges adds nothing; the Mosaic
  GPU per-tile loop over groups: unit = block_m)."""
  sizes = np.asarray(sizes, np.int64)
  ends = np.cumsum(sizes)
  return sum(int(-(-e // unit) - s // unit) * unit for s, e in zip(ends - sizes, ends) if e > s)


ROUTED = dict(m=8192, k=2048, n=1024)  # the issue's case: m = 8192 rows, random routing


def _routed_sizes(num_groups, seed=0):
  return np.random.default_rng(seed).multinomial(
      ROUTED["m"], [1 / num_groups] * num_groups).astype(np.int32)


@pytest.mark.slow
@pytest.mark.parametrize("num_groups", [8, 64, 256])
def test_work_counts_are_the_designed_rows_and_near_ideal_at_m8192(num_groups, monkeypatch):
  m, k, n = ROUTED["m"], ROUTED["k"], ROUTED["n"]
  sizes = _routed_sizes(num_groups)
  for direction, bm in (("fwd", GPU_TILING.fwd.block_m), ("drhs", GPU_TILING.drhs_tiles.block_m)):
    triton = work.direction_work(direction, m, k, n, sizes, implementation="gpu")
    assert triton.macs == _rows_chunked_gpu(sizes, bm) * k * n, direction
    assert triton.ideal_macs == m * k * n and triton.pad_bytes == 0
    # The issue's target (1.10x) where the hardware's row granularity allows it; at 256
    # groups of ~32 rows, 16-row MMAs leave ~7.5 rows per group (expected 1.23x).
    assert triton.mac_ratio < {8: 1.02, 64: 1.10, 256: 1.25}[num_groups], direction
  tpu_work = work.direction_work("fwd", m, k, n, sizes, implementation="tpu")
  assert tpu_work.macs == _rows_rounded_out(sizes, 16) * k * n  # bf16: 16-row sublane tiles
  # Mosaic GPU gmm (jax >= 0.11.2): 8-row chunks from 8-aligned starts, each group rounded out
  # to 8 rows; on older JAX, the whole 128-row tile per group. Its tgmm contracts each group
  # over a span from an 8-aligned start, a multiple of 16 rows long.
  for chunked, unit in ((True, 8), (False, MOSAIC_GPU_TILING.fwd.block_m)):
    monkeypatch.setattr(mosaic_gpu, "chunked_gmm", lambda chunked=chunked: chunked)
    for direction in ("fwd", "dlhs"):
      mosaic = work.direction_work(direction, m, k, n, sizes, implementation="mosaic_gpu")
      assert mosaic.macs == _rows_rounded_out(sizes, unit) * k * n, (direction, chunked)
  assert mosaic.mac_ratio > 1.09  # the tile loop: 1.09x / 1.92x / 4.92x
  monkeypatch.setattr(mosaic_gpu, "chunked_gmm", lambda: True)
  assert work.direction_work("fwd", m, k, n, sizes, implementation="mosaic_gpu").mac_ratio < {
      8: 1.01, 64: 1.06, 256: 1.23}[num_groups]
  mosaic = work.direction_work("drhs", m, k, n, sizes, implementation="mosaic_gpu")
  assert mosaic.macs == _rows_tgmm_mosaic_gpu(sizes) * k * n
  # whole 64-row tiles per group were 1.05x / 1.46x / 2.96x; ~11 rows per group are left
  assert mosaic.mac_ratio < {8: 1.02, 64: 1.10, 256: 1.37}[num_groups]


def test_work_counts_by_hand_on_a_small_ragged_case():
  c = CASES["ragged_empty_tail"]  # m = 64, k = 40, n = 24; groups of 7, 20, 3, 23 rows
  tiles = Tiles(16, 16, 16)  # k padded to 48, n to 32
  triton = work.gmm_work(c.m, c.k, c.n, c.sizes, implementation="gpu", tiles=tiles,
                         itemsize=4)
  assert triton.macs == (16 + 32 + 16 + 32) * 48 * 32  # each group rounded up to 16 rows
  assert triton.ideal_macs == 53 * 40 * 24
  assert triton.pad_bytes == 4 * ((64 * 40 + 64 * 48) + (7 * 40 * 24 + 7 * 48 * 32) +
                                  (64 * 32 + 64 * 24))  # lhs, weights, output slice
  tpu_work = work.gmm_work(c.m, c.k, c.n, c.sizes, implementation="tpu", tiles=tiles,
                           itemsize=4, interpret=True)
  # 8-row sublane blocks: [0, 8) + [0, 32) + [24, 32) + [24, 56) (the tile splits add none);
  # 8-wide k and n tiles divide 40 and 24 here, so nothing is padded
  assert tpu_work.macs == (8 + 32 + 8 + 32) * 40 * 24 and tpu_work.pad_bytes == 0
  tgmm_work = work.tgmm_work(c.m, c.k, c.n, c.sizes, implementation="gpu", tiles=tiles,
                             itemsize=4)
  assert tgmm_work.macs == triton.macs
  tgmm_work = work.tgmm_work(c.m, c.k, c.n, c.sizes, implementation="tpu", tiles=tiles,
                             itemsize=4, interpret=True)
  assert tgmm_work.macs == tpu_work.macs


def test_k_and_n_tiles_divide_the_weights_instead_of_padding_them():
  # k = 768 with the TPU default 512: a 384 tile divides it (no weight copy, no padded MACs).
  sizes = _routed_sizes(8)
  w = work.gmm_work(8192, 768, 1024, sizes, implementation="tpu", tiles=TPU_TILING.fwd)
  assert w.pad_bytes == 0 and w.macs == _rows_rounded_out(sizes, 16) * 768 * 1024
  assert api.fit_tile("tpu", False, "block_k", 512, 768, lane=True) == (384, 768)
  # n = 1408 = 11 x 128: no tile in [256, 512] divides it; the TPU tile rises to the whole
  # axis (its blocks fit VMEM) instead of padding the weights to 1536 on every call
  w = work.gmm_work(8192, 768, 1408, sizes, implementation="tpu", tiles=TPU_TILING.fwd)
  assert w.pad_bytes == 0 and w.macs == _rows_rounded_out(sizes, 16) * 768 * 1408
  assert api.fit_tiles("tpu", False, TPU_TILING.fwd, 8192, 1408, 768, itemsize=2) == (
      Tiles(256, 1408, 384), (8192, 1408, 768))
  # n = 1664 = 13 x 128: the whole axis fits VMEM with bf16 blocks, not with float32 ones,
  # which pad to 2048 as before, and the counter charges the copy (read + write), the output
  # slice and the padded MACs
  assert api.fit_tiles("tpu", False, TPU_TILING.fwd, 8192, 2048, 1664, itemsize=2)[0] == (
      Tiles(256, 512, 1664))
  assert api.tpu_vmem_bytes(Tiles(256, 512, 1664), 4) > api.TPU_VMEM_BUDGET
  w = work.gmm_work(8192, 2048, 1664, sizes, implementation="tpu", tiles=TPU_TILING.fwd,
                    itemsize=4)
  assert w.pad_bytes == 4 * ((8 * 2048 * 1664 + 8 * 2048 * 2048) + (8192 * 2048 + 8192 * 1664))
  assert w.macs == _rows_rounded_out(sizes, 8) * 2048 * 2048
  assert api.fit_tile("gpu", False, "block_k", 64, 96, lane=True) == (32, 96)
  # 16 divides 80 but is under half the tile: padded instead (to 128)
  assert api.fit_tile("gpu", False, "block_k", 128, 80, lane=True) == (128, 128)
  assert api.fit_tile("mosaic_gpu", False, "block_n", 256, 384, lane=True) == (192, 384)
  # Mosaic GPU's row tile is halved to fit few rows, never cut to a non-power of two such as
  # 192 (gmm's chunk heights halve from it: mosaic_gpu.GMM_BLOCK_M)
  assert api.fit_tile("mosaic_gpu", False, "block_m", 256, 130, lane=False) == (256, 256)
  assert api.fit_tile("mosaic_gpu", False, "block_m", 256, 60, lane=False) == (64, 64)


@pytest.mark.slow
def test_tpu_lane_tiles_rise_to_divide_the_axes_instead_of_padding():
  # k = 36 and n = 44: no 8-multiple in [8, 16] divides either, so the 16-wide tiles rise to
  # the whole axis (36, 44) in every direction; the kernels run those blocks in the simulator.
  c = Case(m=40, k=36, n=44, sizes=(11, 0, 19, 6))
  for tiles, (k, n) in ((SMALL.fwd, (36, 44)), (SMALL.dlhs, (44, 36)), (SMALL.drhs, (36, 44))):
    fitted, (_, k_pad, n_pad) = api.fit_tiles("tpu", True, tiles, c.m, k, n, itemsize=4)
    assert (fitted.block_k, fitted.block_n, k_pad, n_pad) == (k, n, k, n)
  _check_against_reference(c, "tpu", KERNELS["tpu"])


def test_work_counter_refuses_what_it_cannot_count():
  with pytest.raises(ValueError, match="implementation='ragged_dot'"):
    work.gmm_work(64, 16, 16, [64], implementation="ragged_dot", tiles=Tiles())
  with pytest.raises(ValueError, match="direction must be one of.*'bwd'"):
    work.direction_work("bwd", 64, 16, 16, [64], implementation="gpu")


# Several groups per 64-row tile: exercises every chunk height (Triton 64/32/16; TPU f32
# 64/32/16/8) against the reference, with empty groups and a NaN tail past the sum.
CHUNKED = Case(m=136, k=16, n=16, sizes=(0, 70, 5, 0, 9, 1, 17, 30))
CHUNKED_TILING = Tiling(fwd=Tiles(64, 16, 16), dlhs=Tiles(64, 16, 16), drhs=Tiles(64, 16, 16))


@pytest.mark.parametrize("implementation", _implementations("gpu", "tpu"))
def test_chunked_schedules_match_reference_with_many_groups_per_tile(implementation):
  _check_against_reference(CHUNKED, implementation, KERNELS[implementation],
                           tiling=CHUNKED_TILING)


def _select_dtypes_in_kernels(jaxpr, inside=False, found=None):
  """dtypes of every select (jnp.where) inside the pallas_call kernels of a jaxpr."""
  found = [] if found is None else found
  for eqn in jaxpr.eqns:
    if inside and eqn.primitive.name == "select_n":
      found.append(jnp.dtype(eqn.outvars[0].aval.dtype))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          _select_dtypes_in_kernels(sub, inside or eqn.primitive.name == "pallas_call", found)
  return found


def test_tpu_tgmm_selects_rows_in_float32_on_bf16_operands():
  # Older TPUs have no bf16 vector unit: the row masks of bf16 tiles are selects in float32.
  from pallas_kernels.grouped_matmul import tpu  # pylint: disable=g-import-not-at-top
  x = jnp.ones((32, 16), jnp.bfloat16)
  starts, ends = jnp.array([0, 5], jnp.int32), jnp.array([5, 30], jnp.int32)
  jaxpr = jax.make_jaxpr(lambda x, y, s, e: tpu.tgmm(
      x, y, s, e, tiles=Tiles(16, 16, 16), out_dtype=jnp.bfloat16))(x, x, starts, ends)
  dtypes = _select_dtypes_in_kernels(jaxpr.jaxpr)
  assert jnp.dtype(jnp.float32) in dtypes and jnp.dtype(jnp.bfloat16) not in dtypes
