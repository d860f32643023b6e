"""Every kernel through the accelerators' own compilers, compile-only (pallas_kernels/targets.py):
Mosaic inside libtpu for TPU v4, v5e, v5p and v6e, and XLA's GPU compiler (Mosaic GPU, Triton)
for an H100 described by XLA's target config. The cases are experiments/compile_matrix.py's
(which prints them as a table); forward and backward are compiled together; a case compiles,
or is refused before any kernel is traced by a rule that names itself.

Marked `compile`: `make test-compile` runs them (Python 3.12, jax[tpu,cuda12] pinned); elsewhere
they skip, saying which package is missing.
"""
from pallas_kernels import targets  # first: sets libtpu's and the CUDA plugin's variables

import importlib.util  # noqa: E402

import pytest  # noqa: E402

from experiments import compile_matrix  # noqa: E402

pytestmark = pytest.mark.compile

H100 = "gpu:h100:1"


def _target(name: str):
  package = "libtpu" if name.startswith("tpu") else "jax_plugins.xla_cuda12"
  try:
    found = importlib.util.find_spec(package) is not None
  except ModuleNotFoundError:
    found = False
  if not found:
    pytest.skip(f"{package} is not installed (make test-compile installs it)")
  return targets.get(name)


# --- the named targets ------------------------------------------------------------------------


def test_an_unknown_target_is_one_line_listing_the_known_ones():
  for bad in ("tpu:v9:2x2", "gpu:a100:8", "gpu:h100:0", "tpu:v5e:2by2", "v5e"):
    with pytest.raises(targets.TargetError) as raised:
      targets.get(bad)
    message = str(raised.value)
    assert "\n" not in message and repr(bad) in message and "tpu:v5p:4x4x4" in message


@pytest.mark.parametrize("name, count, kind", [
    ("tpu:v5e:2x2", 4, "TPU v5 lite"), ("tpu:v5p:4x4x4", 64, "TPU v5"),
    ("tpu:v6e:2x4", 8, "TPU v6 lite"), ("gpu:h100:8", 8, "NVIDIA H100 80GB HBM3"),
    ("gpu:h200:8", 8, "NVIDIA H200 141GB HBM3e")])
def test_a_named_target_gives_compile_only_devices_of_that_kind(name, count, kind):
  target = _target(name)
  assert target.num_devices == count and target.device_kind == kind
  assert target.hbm_bytes > 8 << 30 and target.peak_bf16_tflops > 100


def test_the_private_gpu_entry_is_where_targets_expects_it():
  """GPU targets go through a private JAX entry; a JAX that moves it fails here, loudly."""
  _target(H100)
  from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  assert callable(getattr(_jax, "get_default_c_api_topology", None))
  config = targets.gpu_target_config("h100")
  assert "shared_memory_per_block_optin: 232448" in config  # the H100's opt-in SMEM limit
  assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in config


# --- every kernel, every target ---------------------------------------------------------------


_CASES = [pytest.param(family, case, f"{t}/{i}")
          for family, case in compile_matrix.all_cases() for t, i in compile_matrix.COLUMNS]


@pytest.mark.parametrize("family, case, column", _CASES)
def test_the_kernel_compiles_or_is_refused_by_a_stated_rule(family, case, column):
  target_name, implementation = column.split("/")
  _target(target_name)
  outcome = compile_matrix.compile_case(family, case, target_name, implementation)
  assert outcome.status in ("compiled", "refused", "n/a"), outcome
  if outcome.status == "refused":  # a rule that says what it is, in one line
    assert "\n" not in outcome.detail and len(outcome.detail) > 40, outcome


@pytest.mark.parametrize("target_name", compile_matrix.TPUS)
def test_the_segment_ids_backward_compiles_on_every_tpu(target_name):
  """Issue 32's observed failure: dK/dV with segment ids overflowed v5e's and v5p's VMEM."""
  _target(target_name)
  outcome = compile_matrix.compile_case("attention", "segments_gqa4_d64_4k", target_name, "tpu")
  assert outcome.status == "compiled", outcome


@pytest.mark.parametrize("case", ["square_2048", "square_4096"])
def test_a_monarch_layer_too_wide_for_vmem_is_refused_naming_the_limit(case):
  from pallas_kernels import tiling  # pylint: disable=g-import-not-at-top
  _target("tpu:v5e:1x1")
  outcome = compile_matrix.compile_case("monarch", case, "tpu:v5e:1x1", "tpu")
  assert outcome.status == "refused", outcome
  limit = tiling.TPU_VMEM["TPU v5 lite"].most
  assert f"{limit >> 20} MiB limit effjax asks of TPU v5e" in outcome.detail, outcome


# --- the kernels' cost estimates reach the compiler's cost analysis ----------------------------


@pytest.mark.parametrize("case", ["gqa4_d128_2k", "causal_32k", "window256_gqa2_noncausal"])
def test_compiled_attention_flops_are_the_work_counters(case):
  """Every TPU attention pallas_call carries a pl.CostEstimate from its plan: the compiled
  program's flops are the work counter's multiply-adds x 2 (XLA's own ops add < 0.1%).
  Without the estimates the kernels' flops were unknown to the cost model (about 4e6 here)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from pallas_kernels.attention import work  # pylint: disable=g-import-not-at-top
  _target("tpu:v5e:1x1")
  b, t, n, kv, d, dtype, options = compile_matrix.ATTENTION[case]
  outcome = compile_matrix.compile_case("attention", case, "tpu:v5e:1x1", "tpu")
  counted = work.count_work(implementation="tpu", batch=b, q_heads=n, kv_heads=kv, q_len=t,
                            kv_len=t, head_dim=d, itemsize=jnp.dtype(dtype).itemsize,
                            causal=options.get("causal", False),
                            sliding_window=options.get("sliding_window"))
  macs = sum(w.macs for w in counted.values())
  assert outcome.flops == pytest.approx(2 * macs, rel=1e-3), outcome


@pytest.mark.parametrize("implementation, target_name", [("mosaic_gpu", H100),
                                                         ("tpu", "tpu:v5e:1x1")])
def test_each_attention_kernels_cost_estimate_is_its_work_count(implementation, target_name,
                                                                 monkeypatch):
  """Per kernel (forward, dQ, dK/dV), the estimate handed to the compiler is the work
  counter's multiply-adds x 2, for Mosaic GPU (whose compile-only cost analysis reports
  nothing) as for Mosaic TPU."""
  from pallas_kernels.attention import common, work  # pylint: disable=g-import-not-at-top
  _target(target_name)
  estimated = {}
  original = common.cost_estimate

  def spy(plan, p, args, out_shapes):
    cost = original(plan, p, args, out_shapes)
    estimated[plan.name] = cost.flops
    return cost
  monkeypatch.setattr(common, "cost_estimate", spy)
  import jax  # pylint: disable=g-import-not-at-top
  jax.clear_caches()  # the case may have been traced in this worker already
  b, t, n, kv, d, _, options = compile_matrix.ATTENTION["gqa4_d128_2k"]
  outcome = compile_matrix.compile_case("attention", "gqa4_d128_2k", target_name, implementation)
  assert outcome.status == "compiled", outcome
  counted = work.count_work(implementation=implementation, batch=b, q_heads=n, kv_heads=kv,
                            q_len=t, kv_len=t, head_dim=d, itemsize=2, causal=True)
  assert estimated == {name: 2 * w.macs for name, w in counted.items()}


def test_each_monarch_mosaic_gpu_kernels_cost_estimate_is_its_work_count(monkeypatch):
  """Forward, the token-tile backward (H recomputed, dH, dx) and one kernel per weight
  gradient each hand the compiler their own products' flops."""
  import math  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from effjax.layers.monarch import monarch_shapes  # pylint: disable=g-import-not-at-top
  from pallas_kernels import compat  # pylint: disable=g-import-not-at-top
  _target(H100)
  estimated = []
  original = compat.mosaic_gpu_cost

  def spy(cost):
    estimated.append(cost.flops)
    return original(cost)
  monkeypatch.setattr(compat, "mosaic_gpu_cost", spy)
  jax.clear_caches()  # the case may have been traced in this worker already
  tokens, n_in, n_out, nblocks = compile_matrix.MONARCH["square_1024"]
  outcome = compile_matrix.compile_case("monarch", "square_1024", H100, "mosaic_gpu")
  assert outcome.status == "compiled", outcome
  macs1, macs2 = (math.prod(s) for s in monarch_shapes(n_in, n_out, nblocks))
  assert sorted(estimated) == sorted(2 * tokens * m for m in (
      macs1 + macs2, 2 * macs1 + macs2, macs2, macs1))  # fwd, token-tile bwd, dw2, dw1


def test_compiled_grouped_matmul_flops_are_the_kernels_products():
  """gmm and tgmm carry their products' flops: the gradient of sum(gmm(x, w)) runs the
  transposed gmm (dX) and tgmm (dW), 2 m k n flops each (the forward is not needed by it)."""
  _target("tpu:v5e:1x1")
  m, k, n, *_ = compile_matrix.GMM["g8_2048x1408"]
  outcome = compile_matrix.compile_case("gmm", "g8_2048x1408", "tpu:v5e:1x1", "tpu")
  assert outcome.flops == pytest.approx(2 * 2 * m * k * n, rel=1e-3), outcome


def test_xla_compiles_the_triton_kernels_with_the_shared_memory_effjax_estimates(monkeypatch):
  """Triton compiles for the H100 when traced under the target's mesh. XLA's own figure for
  each kernel's shared memory is at most gpu.SMEM_HEADROOM x gpu.smem_bytes, the estimate by
  which default blocks are halved until they fit (the GQA-8 head_dim-256 forward asked for
  576 KiB of the H100's 227 KiB before)."""
  from pallas_kernels.attention import gpu  # pylint: disable=g-import-not-at-top
  _target(H100)
  estimated = {}
  original = gpu.check_smem

  def spy(plan, groups):
    name = {"forward": "fwd"}.get(plan.name, plan.name)
    estimated[f"effjax_flash_{name}"] = gpu.smem_bytes(plan)  # the last: the blocks used
    return original(plan, groups)
  monkeypatch.setattr(gpu, "check_smem", spy)
  # GQA 4, GQA 8 at head_dim 256 (blocks halved to fit), and a split dK/dV (MHA, d96, ragged)
  for case in ("gqa4_d128_2k", "softcap_gqa8_d256", "mha_d96_ragged1000"):
    estimated.clear()
    assert compile_matrix.compile_case("attention", case, H100, "triton").status == "compiled"
    report = compile_matrix.triton_report("attention", case)
    compiled = {k["name"]: k["smem"] for k in report["kernels"]}
    assert compiled.keys() == estimated.keys(), (case, report)
    for name, smem in compiled.items():
      # never above the estimate with headroom, which the blocks were fitted with
      assert smem <= estimated[name] * gpu.SMEM_HEADROOM, (case, name, smem, estimated)
      assert smem <= 232448  # the H100's opt-in shared memory per block


def test_ptxas_runs_on_the_triton_kernels_inside_xlas_compile():
  """XLA discards a compile whose ptxas output spills when asked to: the grouped matmul's
  Triton kernels spill nothing (so ptxas's verdict is read, not assumed)."""
  _target(H100)
  report = compile_matrix.triton_report("gmm", "g8_2048x1408")
  assert [k["name"] for k in report["kernels"]] == ["effjax_tgmm", "effjax_gmm"], report
  assert report["spills"] is False, report


def test_ptxas_runs_on_the_mosaic_gpu_kernels_and_reports_their_registers():
  """Mosaic GPU compiles its kernels with ptxas while lowering for the H100: the report names
  every kernel's registers and spills (the grouped matmul's two backward kernels spill none)."""
  _target(H100)
  report = compile_matrix.ptxas_report("gmm", "g8_2048x1408")
  assert len(report) == 2, report  # dX (a transposed gmm) and tgmm: the forward is not needed
  for kernel in report:
    assert 0 < kernel["registers"] <= 255 and kernel["spill_stores"] == 0, report
