"""pallas_kernels.attention: the kernels (in interpreters) against the pure-jnp reference.

GPU (Triton-style) kernels run under Pallas's generic interpreter, TPU (Mosaic) kernels under
the TPU simulator with out-of-bounds reads raising; both also lower for their real platform.
Errors are ||out - ref|| / ||ref|| against the reference evaluated in float32.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import compat
from pallas_kernels.attention import BlockSizes, attention_reference, default_implementation
from pallas_kernels.attention import flash_attention
from pallas_kernels.attention import api as attention_api
from pallas_kernels.attention import work

F32_TOL, BF16_TOL = 1e-3, 1e-2


@dataclasses.dataclass(frozen=True)
class Case:
  t: int  # query length
  n: int  # query heads
  k: int  # kv heads
  d: int = 16
  s: int | None = None  # key length (default t)
  b: int = 2
  causal: bool = False
  window: int | None = None
  softcap: float | None = None
  segments: bool = False
  docs: tuple[int, ...] | None = None  # segment ids from these document lengths, else random
  dtype: str = "float32"
  blocks: BlockSizes = BlockSizes(32, 32)
  gpu_cores: int | None = None  # SM count the GPU dK/dV grid is sized for (None: H100's)

  @property
  def name(self):  # short test id, e.g. t77_n4k1_d16_causal_win10_seg_f32
    parts = [f"t{self.t}" + (f"s{self.s}" if self.s else ""), f"n{self.n}k{self.k}",
             f"d{self.d}", "causal" if self.causal else "",
             f"win{self.window}" if self.window else "",
             f"cap{self.softcap:g}" if self.softcap else "", "seg" if self.segments else "",
             "docs" if self.docs else "", f"sm{self.gpu_cores}" if self.gpu_cores else "",
             "f32" if self.dtype == "float32" else "bf16"]
    return "_".join(p for p in parts if p)

  @property
  def kwargs(self):
    return dict(causal=self.causal, sliding_window=self.window, logit_softcap=self.softcap)


def _inputs(c: Case, seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  s = c.s or c.t
  dtype = jnp.dtype(c.dtype)
  q = jax.random.normal(keys[0], (c.b, c.t, c.n, c.d), dtype)
  k = jax.random.normal(keys[1], (c.b, s, c.k, c.d), dtype)
  v = jax.random.normal(keys[2], (c.b, s, c.k, c.d), dtype)
  seg = None
  if c.docs:
    seg = jnp.broadcast_to(jnp.repeat(jnp.arange(len(c.docs), dtype=jnp.int32),
                                      jnp.array(c.docs), total_repeat_length=c.t), (c.b, c.t))
  elif c.segments:  # packed documents of random lengths, ids increasing along the sequence
    starts = jax.random.bernoulli(keys[3], 0.1, (c.b, c.t)).at[:, 0].set(True)
    seg = jnp.cumsum(starts, axis=1).astype(jnp.int32)
  cot = jax.random.normal(keys[4], (c.b, c.t, c.n, c.d), jnp.float32)  # not all-ones: mixes rows
  return q, k, v, seg, cot


def _rel(x, ref):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  assert np.isfinite(x).all(), "non-finite values"
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _loss(fn, cot):
  return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cot)


def _jitted_value_and_vjp(fn, cot):
  """fn(q, k, v) and the gradient of sum(fn(q, k, v) * cot), compiled as one program (eager
  op-by-op dispatch of the interpreted kernels costs several times more)."""
  def value_and_vjp(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(cot.astype(out.dtype))
  return jax.jit(value_and_vjp)


def _check_against_reference(c: Case, implementation, interpret, monkeypatch=None):
  q, k, v, seg, cot = _inputs(c)
  if c.gpu_cores is not None:
    monkeypatch.setattr(compat, "gpu_core_count", lambda: c.gpu_cores)

  def kernel(q, k, v):
    return flash_attention(q, k, v, segment_ids=seg, block_sizes=c.blocks,
                           implementation=implementation, interpret=interpret, **c.kwargs)

  def ref(q, k, v):  # float32 reference, whatever the kernel's dtype
    return attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                               v.astype(jnp.float32), segment_ids_BT=seg, **c.kwargs)

  tol = F32_TOL if c.dtype == "float32" else BF16_TOL
  out, grads = _jitted_value_and_vjp(kernel, cot)(q, k, v)
  ref_out, ref_grads = _jitted_value_and_vjp(ref, cot)(q, k, v)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert _rel(out, ref_out) < tol
  for name, g, r in zip("qkv", grads, ref_grads):
    assert g.shape == r.shape and g.dtype == q.dtype, name
    assert _rel(g, r) < tol, f"d{name}"
  return out, grads


# Sequence lengths on and off block multiples, GQA ratios 1/2/4/8, each feature, both dtypes.
# The dK/dV grid splits key blocks over programs to fill the GPU's SMs at these small shapes,
# except where gpu_cores=1 (one program per key block, dK/dV written directly).
GPU_CASES = [
    Case(t=64, n=2, k=2, d=32, gpu_cores=1),                                 # blocks fit
    Case(t=50, n=4, k=2, causal=True, blocks=BlockSizes(16, 16)),            # ragged, GQA 2
    Case(t=77, n=4, k=1, causal=True, window=10, segments=True,              # GQA 4, bwd
         blocks=BlockSizes(32, 16, block_q_bwd=16, block_k_bwd=32)),         # blocks differ
    Case(t=100, n=8, k=1, window=13, softcap=5.0, blocks=BlockSizes(16, 32)),  # two-sided window
    Case(t=45, n=2, k=1, segments=True, d=24),                               # head_dim 24 -> 32
    Case(t=40, s=24, n=2, k=2, causal=True, window=6),                       # rows seeing nothing
    Case(t=96, n=4, k=2, causal=True, segments=True, softcap=20.0, dtype="bfloat16"),
    Case(t=70, n=8, k=2, window=20, dtype="bfloat16", blocks=BlockSizes(16, 32)),
]


@pytest.mark.slow
@pytest.mark.parametrize("c", GPU_CASES, ids=lambda c: c.name)
def test_gpu_kernel_interpreted_matches_reference(c, monkeypatch):
  _check_against_reference(c, "gpu", interpret=True, monkeypatch=monkeypatch)


TPU_CASES = [
    # Documents of 256, 45 and 83 tokens under 128-key blocks (the (8, 128) rule with segment
    # ids): blocks inside one document run unmasked, blocks across documents are masked, and
    # blocks whose documents differ entirely are skipped.
    Case(t=384, b=1, n=4, k=2, causal=True, docs=(256, 45, 83), blocks=BlockSizes(32, 128)),
    Case(t=56, b=1, n=8, k=1, window=9, softcap=5.0, blocks=BlockSizes(16, 16, 32, 16)),
    Case(t=48, b=1, n=4, k=4, causal=True, window=12, dtype="bfloat16",
         blocks=BlockSizes(16, 16)),
]


@pytest.mark.slow
@pytest.mark.parametrize("c", TPU_CASES, ids=lambda c: c.name)
def test_tpu_kernel_in_tpu_simulator_matches_reference(c):
  interpret = compat.tpu_interpret_params(out_of_bounds_reads="raise")
  _check_against_reference(c, "tpu", interpret=interpret)


# Parameter ids avoid the bare words "gpu"/"tpu": conftest skips tests carrying those keywords.
@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["gpu", "tpu"], ids=["triton_style", "mosaic"])
def test_query_rows_that_see_no_key_give_zeros_and_zero_gradients(implementation):
  # Queries 29.. of 40 see no key: causal window 6 over 24 keys ends at key 23.
  c = Case(t=40, s=24, b=1, n=2, k=1, causal=True, window=6, blocks=BlockSizes(16, 16))
  interpret = True if implementation == "gpu" else compat.tpu_interpret_params()
  out, (dq, _, _) = _check_against_reference(c, implementation, interpret)
  assert float(jnp.abs(out[:, 29:]).max()) == 0.0
  assert float(jnp.abs(dq[:, 29:]).max()) == 0.0
  assert float(jnp.abs(out[:, :29]).min(axis=-1).max()) > 0.0


@pytest.mark.parametrize("causal", [True, False])
def test_reference_window_semantics_match_jax_local_window(causal):
  # Documented semantics: causal i - w < j <= i; otherwise |i - j| < w.
  q, k, v, _, _ = _inputs(Case(t=24, n=4, k=2))
  w = 5
  ours = attention_reference(q, k, v, causal=causal, sliding_window=w)
  theirs = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla",
                                        local_window_size=(w - 1, 0 if causal else w - 1))
  assert _rel(ours, theirs) < 1e-5
  wider = attention_reference(q, k, v, causal=causal, sliding_window=w + 1)
  assert _rel(wider, theirs) > 1e-2  # the window size is visible in the output


LOWER_CASES = [
    dict(causal=True, segments=True, dtype="bfloat16"),
    dict(window=64, softcap=30.0, dtype="float32", d=96),  # head_dim 96: masked Triton loads
]


@pytest.mark.parametrize("platform", ["cuda", "tpu"], ids=["to_cuda", "to_tpu"])
@pytest.mark.parametrize("features", LOWER_CASES, ids=["causal_seg_bf16", "win_cap_d96_f32"])
def test_kernels_lower_for_their_platform(platform, features, monkeypatch):
  c = Case(t=200, n=8, k=2, **(dict(d=64) | features))  # 200: padded to the default blocks
  q, k, v, seg, cot = _inputs(c)
  implementation = "gpu" if platform == "cuda" else "tpu"

  def fwd_bwd(q, k, v):
    fn = lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, implementation=implementation,
                                         **c.kwargs)
    return jax.value_and_grad(_loss(fn, cot), argnums=(0, 1, 2))(q, k, v)

  if platform == "tpu":
    text = jax.jit(fwd_bwd).trace(q, k, v).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text
    return
  # No GPU here: JAX >= 0.11 lowers Pallas GPU kernels only for an abstract device.
  monkeypatch.setattr(compat, "_triton_noted", False)
  with compat.abstract_gpu(), pytest.warns(FutureWarning, match="Triton backend"):
    text = jax.jit(fwd_bwd).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
  assert "triton" in text.lower()


@pytest.mark.parametrize("implementation", ["reference", "gpu", "tpu"],
                         ids=["reference", "triton_style", "mosaic"])
def test_head_counts_that_do_not_divide_are_a_clear_error(implementation):
  q = jnp.ones((1, 16, 6, 16))
  kv = jnp.ones((1, 16, 4, 16))
  with pytest.raises(ValueError, match="6 heads, which is not a multiple of k/v's 4"):
    flash_attention(q, kv, kv, implementation=implementation, interpret=True)


@pytest.mark.parametrize("t,s", [(0, 16), (16, 0), (0, 0)])
def test_empty_sequences_give_empty_or_zero_outputs_and_gradients(t, s):
  q = jnp.ones((2, t, 4, 16))
  kv = jnp.ones((2, s, 2, 16))
  fn = lambda q, k, v: flash_attention(q, k, v, causal=True, implementation="gpu",
                                       interpret=True)
  out = fn(q, kv, kv)
  assert out.shape == q.shape and not bool(jnp.any(out))
  grads = jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2))(q, kv, kv)
  assert [g.shape for g in grads] == [q.shape, kv.shape, kv.shape]


def test_bad_arguments_are_clear_errors():
  x = jnp.ones((1, 16, 2, 16))
  with pytest.raises(ValueError, match="sliding_window"):
    flash_attention(x, x, x, sliding_window=0)
  with pytest.raises(ValueError, match="logit_softcap"):
    flash_attention(x, x, x, logit_softcap=-1.0)
  with pytest.raises(ValueError, match="dtype"):
    flash_attention(x, x.astype(jnp.bfloat16), x)
  with pytest.raises(ValueError, match="segment_ids"):
    flash_attention(x, x, x, segment_ids=jnp.ones((1, 15), jnp.int32))
  with pytest.raises(ValueError, match="powers of two"):
    flash_attention(x, x, x, implementation="gpu", interpret=True,
                    block_sizes=BlockSizes(24, 16))
  with pytest.raises(ValueError, match="implementation"):
    flash_attention(x, x, x, implementation="cuda")


def test_unsupported_feature_combinations_raise_not_implemented():
  q = jnp.ones((1, 16, 2, 16))
  kv = jnp.ones((1, 24, 2, 16))
  with pytest.raises(NotImplementedError, match="segment_ids with different query"):
    flash_attention(q, kv, kv, segment_ids=jnp.ones((1, 16), jnp.int32), implementation="gpu",
                    interpret=True)
  big = jnp.ones((1, 16, 1, 512))
  with pytest.raises(NotImplementedError, match="head_dim=512"):
    flash_attention(big, big, big, implementation="gpu", interpret=True)


def test_platform_selection_on_cpu():
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU choice")
  assert default_implementation() == "reference"
  assert default_implementation(interpret=True) == "gpu"
  assert default_implementation(interpret=compat.tpu_interpret_params()) == "tpu"
  c = Case(t=33, n=2, k=1, causal=True)
  q, k, v, _, _ = _inputs(c)
  ref = attention_reference(q, k, v, causal=True)
  assert _rel(flash_attention(q, k, v, causal=True), ref) < 1e-6
  assert _rel(flash_attention(q, k, v, causal=True, interpret=True), ref) < F32_TOL


def test_tpu_block_rules_are_checked_up_front_naming_the_block_and_rule():
  x = jnp.ones((1, 1000, 2, 64))
  seg = jnp.ones((1, 1000), jnp.int32)
  tpu = dict(implementation="tpu", interpret=compat.tpu_interpret_params())
  # Key segment ids reach the kernel as [8, block_k] blocks: 64 lanes is neither 128k nor 1000.
  with pytest.raises(ValueError, match=r"block_k=64 makes the key segment ids an \[8, 64\] "
                                       r"block.*multiple of 128"):
    flash_attention(x, x, x, segment_ids=seg, block_sizes=BlockSizes(128, 64), **tpu)
  with pytest.raises(ValueError, match=r"BlockSizes.block_q_bwd=12 breaks Mosaic's \(8, 128\)"):
    flash_attention(x, x, x, block_sizes=BlockSizes(128, 128, block_q_bwd=12), **tpu)
  with pytest.raises(ValueError, match=r"block_q=8 .*multiples of 16 for 2-byte"):
    flash_attention(x.astype(jnp.bfloat16), x.astype(jnp.bfloat16), x.astype(jnp.bfloat16),
                    block_sizes=BlockSizes(8, 128), **tpu)
  # Without segment ids, or when one key block covers the sequence, 64-key blocks are fine.
  for kw in (dict(block_sizes=BlockSizes(128, 64)),
             dict(block_sizes=BlockSizes(128, 1024), segment_ids=seg)):
    call = attention_api.make_call(
        x.shape, x.shape, causal=False, sliding_window=None, logit_softcap=None,
        has_segments="segment_ids" in kw, sm_scale=1.0, implementation="tpu",
        block_sizes=kw["block_sizes"], interpret=False, itemsize=4)
    assert attention_api.kernel_dims(call, 1000, 1000, 64, True)[2] in (64, 1000)


@pytest.mark.parametrize("length,groups,want", [(4096, 1, (512, 512)), (4096, 4, (512, 512)),
                                                (4096, 8, (256, 512)), (1000, 1, (512, 512)),
                                                (600, 1, (128, 128)), (300, 1, (304, 304))])
def test_tpu_default_blocks_are_512_where_the_sequence_allows(length, groups, want):
  blocks = attention_api.tpu_default_block_sizes(length, length, groups, itemsize=2)
  assert (blocks.block_q, blocks.block_k) == want == blocks.bwd


def _compiling_for(device_kind: str):
  """Traces as if for a TPU of this kind (what jax.set_mesh over a target's devices gives)."""
  device = jax.sharding.AbstractDevice(device_kind, 1, "tpu")
  return jax.sharding.use_abstract_mesh(
      jax.sharding.AbstractMesh((1,), ("one",), abstract_device=device))


def test_the_tpu_vmem_budget_is_the_generation_compiled_for():
  from pallas_kernels import tiling  # pylint: disable=g-import-not-at-top
  assert tiling.tpu_vmem_budget() == tiling.TPU_VMEM_ANY  # a CPU host, no mesh
  need = 20 << 20  # over v4's and v5e's default scope, under v6e's
  with _compiling_for("TPU v6 lite"):
    assert tiling.tpu_vmem_budget().generation == "v6e"
    assert tiling.tpu_vmem_limit(need, "k", headroom=1.0) is None  # v6e's 32 MiB scope holds it
  with _compiling_for("TPU v5 lite"):
    assert tiling.tpu_vmem_limit(need, "k", headroom=1.0) == need  # raised to the need
  with _compiling_for("TPU v4"):  # 16 MiB of VMEM in all: refused, naming it
    with pytest.raises(ValueError, match=r"kernel X needs about 20.0 MiB of VMEM with headroom, "
                                         r"over the 16 MiB limit effjax asks of TPU v4"):
      tiling.tpu_vmem_limit(need, "kernel X", headroom=1.0)


def test_default_tpu_blocks_shrink_to_fit_v4_and_given_blocks_are_never_changed(monkeypatch):
  """Issue 32's segment-ids case: its 512 blocks need about 20 MiB of VMEM, which v5e grants
  when asked and v4 does not have; on v4 the defaults halve until every kernel fits."""
  from pallas_kernels import tiling  # pylint: disable=g-import-not-at-top
  from pallas_kernels.attention import tpu  # pylint: disable=g-import-not-at-top
  q = jnp.zeros((1, 4096, 8, 64), jnp.bfloat16)
  kv = jnp.zeros((1, 4096, 2, 64), jnp.bfloat16)
  seg = jnp.zeros((1, 4096), jnp.int32)
  calls = []
  monkeypatch.setattr(attention_api, "_flash_jit", lambda call, *args: calls.append(call))

  def blocks_for(kind, **kw):
    with _compiling_for(kind):
      flash_attention(q, kv, kv, causal=True, segment_ids=seg, implementation="tpu", **kw)
      call = calls.pop()
      for fwd in (True, False):  # every kernel of the chosen blocks fits the generation
        bq, tq, bk, tk, _ = attention_api.kernel_dims(call, 4096, 4096, 64, fwd)
        p = attention_api.problem_for(call, tk)
        plans = ([tpu.forward_plan(p, (1, 8, tq, 64), (1, 2, tk, 64), 2, block_q=bq,
                                   block_k=bk)] if fwd else
                 tpu.backward_plans(p, (1, 8, tq, 64), (1, 2, tk, 64), 2, block_q=bq,
                                    block_k=bk))
        for plan in plans:
          assert (tpu.vmem_bytes(plan) * tiling.TPU_VMEM_HEADROOM
                  <= tiling.TPU_VMEM[kind].most), (kind, call.block_sizes, plan.name)
      return call.block_sizes

  assert blocks_for("TPU v5 lite") == BlockSizes(512, 512, 512, 512)
  on_v4 = blocks_for("TPU v4")
  assert max(on_v4.block_k, on_v4.block_q_bwd, on_v4.block_k_bwd) < 512
  assert min(on_v4.block_q, on_v4.block_k, on_v4.block_q_bwd, on_v4.block_k_bwd) >= 128
  with _compiling_for("TPU v4"), pytest.raises(ValueError, match=r"forward kernel "
                                               r"with block_q=512, block_k=512.*TPU v4"):
    flash_attention(q, kv, kv, causal=True, segment_ids=seg, implementation="tpu",
                    block_sizes=BlockSizes(512, 512))


# Work counts: counted from the kernels' own plans (grids, index maps, loop ranges).
def _count(implementation, **kw):
  kw = dict(batch=1, q_heads=8, kv_heads=8, q_len=1024, kv_len=1024, head_dim=128,
            block_sizes=BlockSizes(128, 128) if implementation == "tpu" else None) | kw
  return work.count_work(implementation=implementation, **kw)


@pytest.mark.parametrize("implementation", ["gpu", "tpu"], ids=["triton_style", "mosaic"])
def test_forward_and_dq_read_kv_once_per_group_whatever_the_group_size(implementation):
  # One kv head shared by G = 1..8 query heads: the K/V traffic is that of G = 1.
  counts = {g: _count(implementation, q_heads=g, kv_heads=1, causal=True) for g in (1, 2, 4, 8)}
  for kernel in ("forward", "dq"):
    kv = {g: c[kernel].kv_bytes for g, c in counts.items()}
    assert len(set(kv.values())) == 1, (kernel, kv)
    # ... while the query side (MACs) grows with G as it must.
    assert counts[8][kernel].macs == 8 * counts[1][kernel].macs


def _pallas_grids(jaxpr):
  """{kernel name: grid} of every pallas_call in a jaxpr and the jaxprs nested in it."""
  grids = {}
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      name = eqn.params.get("name") or eqn.params["name_and_src_info"].name  # jax versions
      grids[str(name)] = tuple(eqn.params["grid_mapping"].grid)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          grids |= _pallas_grids(inner)
  return grids


@pytest.mark.parametrize("implementation", ["gpu", "tpu"], ids=["triton_style", "mosaic"])
def test_counted_grids_are_the_grids_the_call_launches(implementation):
  b, t, n, kv, d = 2, 200, 4, 2, 32
  seg = jnp.repeat(jnp.arange(2, dtype=jnp.int32), 100)[None].repeat(b, 0)
  interpret = True if implementation == "gpu" else compat.tpu_interpret_params()
  q, k = jnp.ones((b, t, n, d)), jnp.ones((b, t, kv, d))

  def loss(q, k, v):
    return jnp.sum(flash_attention(q, k, v, causal=True, segment_ids=seg,
                                   implementation=implementation, interpret=interpret))

  launched = _pallas_grids(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, k).jaxpr)
  counted = work.count_work(implementation=implementation, batch=b, q_heads=n, kv_heads=kv,
                            q_len=t, kv_len=t, head_dim=d, itemsize=4, causal=True,
                            segment_ids=np.asarray(seg), gpu_cores=compat.gpu_core_count())
  suffix = "_tpu" if implementation == "tpu" else ""
  assert {f"effjax_flash_{k}{suffix}": w.grid for k, w in
          (("fwd", counted["forward"]), ("dq", counted["dq"]), ("dkv", counted["dkv"]))
          } == launched


def test_gpu_dkv_grid_fills_the_sms_at_batch_one():
  w = _count("gpu", batch=1, q_heads=8, kv_heads=1, q_len=2048, kv_len=2048, causal=True)
  assert w["dkv"].programs >= 132  # H100's SMs; B * K * (S / 64) alone gives 32
  alone = _count("gpu", batch=1, q_heads=8, kv_heads=1, q_len=2048, kv_len=2048, causal=True,
                 gpu_cores=16)["dkv"]
  assert alone.programs == 32 and alone.grid[-1] == 1
  # Splitting changes who does the work, not how much.
  assert w["dkv"].macs == alone.macs and w["dkv"].blocks_visited == alone.blocks_visited


def _pad_configs(jaxpr):
  """padding_config of every pad in a jaxpr and the jaxprs nested in its equations."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pad":
      yield eqn.params["padding_config"]
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _pad_configs(inner)


@pytest.mark.parametrize("implementation", ["gpu", "tpu"], ids=["triton_style", "mosaic"])
def test_head_dim_96_is_not_padded_in_memory(implementation):
  x = jnp.ones((1, 44, 2, 96))  # 44: the sequence is padded to a block multiple
  interpret = True if implementation == "gpu" else compat.tpu_interpret_params()
  fn = lambda x: flash_attention(x, x, x, causal=True, implementation=implementation,
                                 interpret=interpret)
  configs = list(_pad_configs(jax.make_jaxpr(fn)(x).jaxpr))
  assert configs and all(c[-1] == (0, 0, 0) for c in configs)  # sequence pads only
  # The counted traffic is that of 96 columns (the Triton tiles compute with 128).
  w96, w128 = _count(implementation, head_dim=96), _count(implementation, head_dim=128)
  for kernel in ("forward", "dq", "dkv"):
    assert w96[kernel].kv_bytes * 128 == w128[kernel].kv_bytes * 96
    assert (w96[kernel].macs == w128[kernel].macs) == (implementation == "gpu")


@pytest.mark.parametrize("implementation", ["gpu", "tpu"], ids=["triton_style", "mosaic"])
def test_only_blocks_on_a_boundary_are_masked(implementation):
  blocks = BlockSizes(128, 128)
  # Causal, square blocks: only the diagonal block of each query block row, per head.
  causal = _count(implementation, q_heads=2, kv_heads=1, causal=True, block_sizes=blocks)
  for w in causal.values():
    assert w.blocks_masked == 2 * (1024 // 128) == w.ideal_blocks_masked
    assert w.blocks_visited == 2 * (8 * 9 // 2)
  # Nothing to mask: every block runs unmasked.
  full = _count(implementation, q_heads=2, kv_heads=1, block_sizes=blocks)
  assert all(w.blocks_masked == 0 for w in full.values())
  # 1000 keys padded to 1024: only the last key block column.
  ragged = _count(implementation, q_heads=2, kv_heads=1, q_len=1000, kv_len=1000,
                  block_sizes=blocks)
  assert all(w.blocks_masked == 2 * 8 == w.ideal_blocks_masked for w in ragged.values())
  # Documents of 512, 300 and 212 tokens: masked where a block crosses a document edge,
  # skipped where its query and key documents differ entirely.
  docs = np.repeat(np.arange(3, dtype=np.int32), (512, 300, 212))[None]
  seg = _count(implementation, q_heads=2, kv_heads=1, segment_ids=docs, block_sizes=blocks)
  for w in seg.values():
    assert w.blocks_masked == w.ideal_blocks_masked > 0
    assert w.blocks_visited == w.ideal_blocks_visited < full["forward"].blocks_visited


@pytest.mark.slow
def test_lm_with_pallas_attention_matches_xla_in_logits_and_gradients():
  from effjax.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from effjax.models.decoder_lm import DecoderLM  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig(vocab_size=300, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    d_ff=64)
  tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, 256)
  segments = jnp.array([[1] * 15 + [2] * 25, [1] * 40])
  positions = jnp.array([list(range(15)) + list(range(25)), list(range(40))])
  params = nn.meta.unbox(jax.jit(DecoderLM(cfg).init)(jax.random.key(0), tokens)["params"])
  results = {}
  for impl in ("xla", "pallas"):
    model = DecoderLM(dataclasses.replace(cfg, attention_impl=impl))

    def loss(params, model=model):
      logits = model.apply({"params": params}, tokens, segments, positions)
      return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), logits

    results[impl] = jax.jit(jax.grad(loss, has_aux=True))(params)
  (g_xla, logits_xla), (g_pallas, logits_pallas) = results["xla"], results["pallas"]
  assert _rel(logits_pallas, logits_xla) < 1e-5
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(g_pallas),
                        jax.tree.leaves(g_pallas), jax.tree.leaves(g_xla)):
    assert _rel(a, b) < 1e-4, path[0]


@pytest.mark.drill  # minutes of training; `make test-drills` (CI) runs it
def test_lm_trains_with_pallas_attention_like_xla(test_config, tmp_path):
  from effjax.train.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  from effjax.train.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  from effjax.config import MeshConfig  # pylint: disable=g-import-not-at-top
  losses = {}
  for impl in ("xla", "pallas"):
    # batch over 4 devices, heads over 2: the kernel runs per shard (shard_map)
    cfg = dataclasses.replace(
        test_config, model=dataclasses.replace(test_config.model, attention_impl=impl),
        train=dataclasses.replace(test_config.train, num_steps=4, log_every=1, eval_every=0,
                                  checkpoint_every=0),
        mesh=MeshConfig(data=4, tensor=2))
    workdir = str(tmp_path / impl)
    train_and_evaluate(cfg, workdir)
    metrics = read_metrics(f"{workdir}/metrics.jsonl")
    losses[impl] = np.array([m["train_loss"] for _, m in sorted(metrics.items())
                             if "train_loss" in m])
  assert len(losses["pallas"]) == 4 and np.isfinite(losses["pallas"]).all()
  assert losses["pallas"][-1] < losses["pallas"][0]  # it learns
  np.testing.assert_allclose(losses["pallas"], losses["xla"], rtol=1e-4)
