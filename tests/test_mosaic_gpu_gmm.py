"""pallas_kernels.grouped_matmul with implementation="mosaic_gpu" (Hopper kernels).

Values and gradients run in Mosaic GPU's interpreter (simulated SMEM, TMA, barriers, wgmma)
with its race detector raising, against a float64 numpy loop over groups; that interpreter
ships from jax 0.12, so on older JAX those tests skip (`make test-kernels-latest` runs them).
Lowering for an abstract H100 and the input checks run on every JAX version.
"""
import dataclasses
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import compat
from pallas_kernels.grouped_matmul import Tiles, Tiling, default_implementation, gmm
from pallas_kernels.grouped_matmul import api
from pallas_kernels.grouped_matmul import mosaic_gpu

BF16_TOL = 1e-2
TILES64 = Tiling(fwd=Tiles(64, 64, 64), dlhs=Tiles(64, 64, 64), drhs=Tiles(64, 64, 64))

# gmm's two schedules: group-aligned row chunks (jax >= 0.11.2) and the per-tile loop over groups
# (older JAX, whose layout inference rejects the chunks' transposed store); both are run here.
SCHEDULES = pytest.mark.parametrize("chunked", [True, False], ids=["chunks", "tile_loop"])


@pytest.fixture
def schedule(chunked, monkeypatch):
  if chunked and not mosaic_gpu.chunked_gmm():
    pytest.skip(f"the chunked gmm needs jax >= 0.11.2; this is {jax.__version__}")
  monkeypatch.setattr(mosaic_gpu, "chunked_gmm", lambda: chunked)


needs_interpreter = pytest.mark.skipif(
    not compat.has_gpu_interpreter(),
    reason=f"Mosaic GPU interpret mode (plgpu.InterpretGPUParams) needs jax >= 0.12, this is "
           f"{jax.__version__}; `make test-kernels-latest` runs these")


@dataclasses.dataclass(frozen=True)
class Case:
  m: int
  k: int
  n: int
  sizes: tuple[int, ...]
  dtype: str = "bfloat16"
  transpose_rhs: bool = False
  group_offset: int | None = None  # the shard's first group; its weights: the next G_local
  num_local: int | None = None
  tiling: Tiling | None = TILES64  # None: the default Mosaic GPU tiling


CASES = {
    # 64-row tiles: groups straddle tiles, empty groups first and in the middle, rows past the
    # sum (NaN in lhs) in the last tile; m, k, n off tile multiples (padded by api.py)
    "straddle_empty_bf16": Case(m=200, k=96, n=130, sizes=(0, 50, 0, 100, 30)),
    # fp16, weights stored [G, n, k], a shard of 3 of 5 groups (group_offset=1)
    "shard_transposed_fp16": Case(m=160, k=64, n=72, sizes=(20, 70, 0, 40, 30),
                                  dtype="float16", transpose_rhs=True, group_offset=1,
                                  num_local=3),
    # default tiles (gmm chunks of 128 down to 8 rows): 13 small groups starting off the 8-row
    # grid, so neighbouring chunks share rows and each stores only its own
    "small_groups_default_tiles": Case(m=300, k=64, n=128, sizes=(3, 17, 0, 40, 9, 1, 64, 25,
                                                                  7, 0, 33, 12, 21),
                                       tiling=None),
    # the last group ends at m: tgmm's span for it starts 8 rows early, inside group 1, whose
    # rows there must be zeroed; group 1's span is a 64-row tile and a 16-row chunk
    "group_at_the_end": Case(m=128, k=64, n=64, sizes=(40, 80, 8)),
}


def _inputs(c: Case):
  keys = jax.random.split(jax.random.key(0), 3)
  num_local = c.num_local or len(c.sizes)
  lhs = jax.random.normal(keys[0], (c.m, c.k), jnp.float32)
  lhs = lhs.at[sum(c.sizes):].set(jnp.nan).astype(c.dtype)  # rows in no group must not matter
  shape = (num_local, c.n, c.k) if c.transpose_rhs else (num_local, c.k, c.n)
  rhs = jax.random.normal(keys[1], shape, c.dtype)
  cot = jax.random.normal(keys[2], (c.m, c.n), jnp.float32)
  return lhs, rhs, jnp.array(c.sizes, jnp.int32), cot


def _numpy_loop(c: Case, lhs, rhs, cot):
  """out, dlhs, drhs of sum(out * cot) in float64, the shard's groups only (others: 0)."""
  lhs, rhs, cot = (np.asarray(x, np.float64) for x in (lhs, rhs, cot))
  lhs = np.where(np.isnan(lhs), 0.0, lhs)  # rows past the sum; their outputs are 0 anyway
  w = np.swapaxes(rhs, 1, 2) if c.transpose_rhs else rhs  # [G_local, k, n]
  out, dlhs, dw = np.zeros((c.m, c.n)), np.zeros(lhs.shape), np.zeros(w.shape)
  offset = c.group_offset or 0
  bounds = np.concatenate([[0], np.cumsum(c.sizes)])
  for local in range(w.shape[0]):
    rows = slice(bounds[offset + local], bounds[offset + local + 1])
    out[rows] = lhs[rows] @ w[local]
    dlhs[rows] = cot[rows] @ w[local].T
    dw[local] = lhs[rows].T @ cot[rows]
  return out, dlhs, (np.swapaxes(dw, 1, 2) if c.transpose_rhs else dw)


def _rel(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  assert np.isfinite(x).all(), "non-finite values"
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@needs_interpreter
@SCHEDULES
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_values_and_gradients_in_gpu_interpreter_with_race_detector(case, schedule):
  c = CASES[case]
  lhs, rhs, sizes, cot = _inputs(c)
  offset = None if c.group_offset is None else jnp.int32(c.group_offset)
  interpret = compat.gpu_interpret_params(detect_races=True, on_race="raise")

  def loss(lhs, rhs):
    out = gmm(lhs, rhs, sizes, transpose_rhs=c.transpose_rhs, group_offset=offset,
              tiling=c.tiling, implementation="mosaic_gpu", interpret=interpret)
    return jnp.sum(out.astype(jnp.float32) * cot), out

  (dlhs, drhs), out = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(lhs, rhs)
  for name, got, want in zip(("out", "dlhs", "drhs"), (out, dlhs, drhs),
                             _numpy_loop(c, lhs, rhs, cot)):
    assert got.shape == want.shape and got.dtype == jnp.dtype(c.dtype), name
    assert _rel(got, want) < BF16_TOL, name
  offset_rows = sum(c.sizes[:c.group_offset or 0])
  local_end = offset_rows + sum(c.sizes[c.group_offset or 0:][:rhs.shape[0]])
  assert not np.asarray(out[:offset_rows]).any()  # rows of other shards' groups: exactly 0
  assert not np.asarray(out[local_end:]).any()  # rows past the groups (NaN in lhs): exactly 0
  local_sizes = c.sizes[c.group_offset or 0:][:rhs.shape[0]]
  for g, size in enumerate(local_sizes):
    assert size or not np.asarray(drhs[g]).any(), g  # empty group: exactly zero gradient


@needs_interpreter
def test_interpreter_race_detector_is_on():
  """The kernels above ran with races raising; a plainly racy kernel must raise the same way,
  or the check above would prove nothing."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top

  def racy(x_gmem, out_gmem, smem):
    smem[...] = x_gmem[...]  # both blocks of the grid write all of out below, unordered
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(smem, out_gmem)
    plgpu.wait_smem_to_gmem(0)

  x = jnp.ones((64, 64), jnp.float32)
  kernel = plgpu.kernel(racy, out_type=jax.ShapeDtypeStruct((64, 64), jnp.float32), grid=(2,),
                        grid_names=("b",), scratch_types=[plgpu.SMEM((64, 64), jnp.float32)],
                        interpret=compat.gpu_interpret_params(detect_races=True))
  try:
    with pytest.raises(Exception, match="RACE DETECTED"):
      jax.block_until_ready(kernel(x))
  finally:
    compat.reset_gpu_interpreter()  # JAX requires it after a kernel raised in the interpreter
  # and the same kernel without the detector runs: the error above was the race, nothing else
  quiet = plgpu.kernel(racy, out_type=jax.ShapeDtypeStruct((64, 64), jnp.float32), grid=(2,),
                       grid_names=("b",), scratch_types=[plgpu.SMEM((64, 64), jnp.float32)],
                       interpret=compat.gpu_interpret_params(detect_races=False))
  np.testing.assert_array_equal(np.asarray(quiet(x)), np.asarray(x))


@SCHEDULES
def test_lowers_for_an_abstract_h100_without_triton(schedule):
  # Off-multiple sizes (padded in every axis), default tiles, both weight layouts, a shard.
  m, k, n, num_groups = 1300, 1000, 700, 6
  lhs = jnp.ones((m, k), jnp.bfloat16)
  rhs = jnp.ones((num_groups, k, n), jnp.bfloat16)
  rhs_t = jnp.swapaxes(rhs, 1, 2)
  sizes = jnp.full((num_groups,), 200, jnp.int32)

  def fwd_bwd(lhs, rhs, rhs_t):
    def loss(lhs, rhs, rhs_t):
      out = gmm(lhs, rhs, sizes, implementation="mosaic_gpu")
      out_t = gmm(lhs, rhs_t, sizes, transpose_rhs=True, implementation="mosaic_gpu",
                  group_offset=jnp.int32(0))
      return jnp.sum(out.astype(jnp.float32)) + jnp.sum(out_t.astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(lhs, rhs, rhs_t)

  with compat.abstract_gpu(), warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    text = jax.jit(fwd_bwd).trace(lhs, rhs, rhs_t).lower(lowering_platforms=("cuda",)).as_text()
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) >= 6  # gmm, dlhs, tgmm per layout
  assert "triton" not in text.lower()
  assert not [w for w in caught if "Triton" in str(w.message)]


@pytest.mark.parametrize("capability,want", [((9, 0), "mosaic_gpu"), ((8, 0), "gpu"),
                                             ((10, 0), "gpu"), (None, "gpu")],
                         ids=["sm90", "sm80", "sm100", "unknown"])
def test_default_on_a_gpu_is_mosaic_gpu_on_hopper_only(capability, want, monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(compat, "cuda_compute_capability", lambda: capability)
  assert default_implementation() == want
  assert default_implementation(dtype=jnp.bfloat16) == want
  assert default_implementation(dtype=jnp.float32) == "gpu"  # Mosaic GPU takes no f32 operands


@needs_interpreter
def test_gpu_interpret_params_pick_mosaic_gpu_off_gpu():
  assert default_implementation(interpret=compat.gpu_interpret_params()) == "mosaic_gpu"
  assert default_implementation(interpret=True) == "gpu"


def test_bad_inputs_are_clear_errors(monkeypatch):
  lhs, rhs = jnp.ones((128, 64), jnp.bfloat16), jnp.ones((2, 64, 64), jnp.bfloat16)
  sizes = jnp.array([64, 64], jnp.int32)
  with pytest.raises(NotImplementedError, match="bfloat16/float16 operands, got float32"):
    gmm(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes, implementation="mosaic_gpu")
  with pytest.raises(ValueError, match="multiples of 64 .*Tiles.block_k=32"):
    gmm(lhs, rhs, sizes, implementation="mosaic_gpu",
        tiling=Tiling(fwd=Tiles(64, 32, 64)))
  monkeypatch.setattr(mosaic_gpu, "chunked_gmm", lambda: True)  # checked before lowering
  with pytest.raises(ValueError, match=r"one of \(64, 128, 256\), got Tiles.block_m=192"):
    gmm(jnp.ones((256, 64), jnp.bfloat16), rhs, jnp.array([128, 128], jnp.int32),
        implementation="mosaic_gpu", tiling=Tiling(fwd=Tiles(192, 64, 64)))
  with pytest.raises(ValueError, match="interpret=True"):
    gmm(lhs, rhs, sizes, implementation="mosaic_gpu", interpret=True)
  assert "mosaic_gpu" in api.IMPLEMENTATIONS
