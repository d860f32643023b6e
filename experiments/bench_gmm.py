"""Grouped matmul side by side: effjax's Pallas gmms vs jax.lax.ragged_dot vs a padded einsum.

  python -m experiments.bench_gmm                           # on a GPU: correctness, then timing
  python -m experiments.bench_gmm --out=gmm.json            # also records the rows as JSON
  python -m experiments.bench_gmm --shapes=mixtral --tiles_fwd=128,64,256 --iters=50
  python -m experiments.bench_gmm --preset=cpu              # 2-core CPU: a couple of minutes
  python -m experiments.bench_gmm --nokernels               # correctness + whole MoE layers
  python -m experiments.bench_gmm --preset=work             # counted work only (any machine)

Per shape [m, k] x [G, k, n] and group-size distribution, each direction of the MoE expert
matmul is timed on its own: forward (out = gmm(x, w)), input gradient (dx = gmm(dout, w.T)),
weight gradient (dw = tgmm(x, dout), the ragged contraction over rows). Implementations:
  effjax_mosaic_gpu  pallas_kernels.grouped_matmul's Mosaic GPU kernels (Hopper only: TMA
                 pipelines + wgmma; the default on compute capability 9.x), MOSAIC_GPU_TILING;
  effjax_triton  its Triton-style kernels (implementation="gpu"), GPU_TILING; both with each
                 direction's own tiles (Tiling.fwd / dlhs / drhs; --tiles_* override both).
  effjax_ref     the same API's pure-jnp reference (a scan over groups); CPU preset only.
  ragged_dot     raw jax.lax.ragged_dot; its gradients are JAX's own (jax.vjp w.r.t. one input,
                 so only that direction's op is compiled).
  padded_einsum  every group padded to the largest group's size: gather rows into
                 [G, max, k], one batched einsum, gather back (capacity-style dispatch with
                 capacity = max group size, so nothing is dropped); gradients by jax.vjp.
The Pallas GPU kernels cannot run on a CPU (the interpreter's speed means nothing): the CPU
preset times effjax_ref / ragged_dot / padded_einsum and marks the kernels "n/a"; the
correctness section still runs effjax's kernels there, in their interpreters (Mosaic GPU's
from jax 0.12, on bf16 copies of the inputs: it takes no float32 operands).

Work (every preset, next to the timings; alone with --preset=work): what each effjax kernel's
schedule issues, counted on the host by pallas_kernels/grouped_matmul/work.py from the same
metadata and index maps the kernel uses: MMA tile steps, MACs and bytes loaded/stored, each
next to the ideal (useful MACs; each operand read once), plus api.py's padding copies. The
work preset counts the Triton, Mosaic GPU and TPU schedules on WORK_SHAPES (m = 8192 routed
rows over 8, 64, 256 experts, uniform random routing) with the default tilings, bf16.

Timing: random normal inputs (--dtype; bf16 on GPU, float32 on the CPU preset), group sizes
passed as a traced argument (one compilation per shape), --warmup calls after compilation,
then the median of --iters individually timed calls, each ended by block_until_ready.
TF/s counts the useful work 2 m k n (padding and masked work are not credited).
Memory: the compiled program's temp allocation (memory_analysis().temp_size_in_bytes: what
it needs beyond its inputs and outputs), in MiB.

Shapes (rows m = tokens x top-k; k, n from the published configs; the dispatch is the up- or
gate-projection unless named "down"):
  mixtral          [8192, 4096] x [8, 4096, 14336]   Mixtral 8x7B (reference/moe.md anchor)
  deepseek_v2_lite [24576, 2048] x [64, 2048, 1408]  DeepSeek-V2-Lite, 4096 tokens x top-6
  deepseek_v2      [24576, 5120] x [160, 5120, 1536] DeepSeek-V2, 4096 tokens x top-6
  deepseek_v3      [32768, 7168] x [256, 7168, 2048] DeepSeek-V3, 4096 tokens x top-8
  deepseek_v3_down [32768, 2048] x [256, 2048, 7168] its down-projection (k = expert width)
  small_k256       [16384, 256] x [64, 256, 4096]    small contraction
  small_k1024      [16384, 1024] x [64, 1024, 4096]
CPU preset: mixtral_tiny [2048, 256] x [8, 256, 896], deepseek_tiny [1024, 256] x
[64, 256, 128], small_k_tiny [2048, 64] x [16, 64, 512] (float32; 5 timed calls).
Distributions: balanced (m / G rows each, remainder spread), skewed (a multinomial draw of
m rows over G experts with Dirichlet(0.5) probabilities, seeded: a few hot experts, some
nearly empty) and random (a seeded multinomial draw with equal probabilities: uniform random
routing).

Whole MoE layer (--moe_layer, on by default): effjax.moe.MoELayer (router, dispatch, SwiGLU
experts, combine, aux losses) forward + backward with respect to its params and input, per
implementation: dropless with gmm_impl=pallas, dropless with gmm_impl=ragged_dot, and the
capacity einsum (capacity factor 1.25; what it drops is printed). The router at init routes
nearly uniformly; its load max/mean is printed. Layers (T tokens, D, expert width F, E, k):
mixtral (4096, 4096, 14336, 8, 2) and deepseek_v2_lite (4096, 2048, 1408, 64, 6) on a GPU;
mixtral_tiny (1024, 256, 896, 8, 2) and deepseek_tiny (256, 256, 128, 64, 4) on the CPU
preset, where gmm_impl=pallas is the jnp reference (the platform default there).
"""
from __future__ import annotations

import functools
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import compat
from pallas_kernels.grouped_matmul import GPU_TILING, MOSAIC_GPU_TILING, TPU_TILING, Tiles, Tiling
from pallas_kernels.grouped_matmul import gmm, tgmm, work

GPU_SHAPES = {  # name: (m, k, n, G)
    "mixtral": (8192, 4096, 14336, 8),
    "deepseek_v2_lite": (24576, 2048, 1408, 64),
    "deepseek_v2": (24576, 5120, 1536, 160),
    "deepseek_v3": (32768, 7168, 2048, 256),
    "deepseek_v3_down": (32768, 2048, 7168, 256),
    "small_k256": (16384, 256, 4096, 64),
    "small_k1024": (16384, 1024, 4096, 64),
}
CPU_SHAPES = {  # the same families, shrunk for two CPU cores
    "mixtral_tiny": (2048, 256, 896, 8),
    "deepseek_tiny": (1024, 256, 128, 64),
    "small_k_tiny": (2048, 64, 512, 16),
}
# The issue-20 case: m = 8192 routed rows, uniform random routing over 8, 64, 256 experts
# (k, n as DeepSeek-V2-Lite's up-projection). Counted only: --preset=work.
WORK_SHAPES = {
    "routed_e8": (8192, 2048, 1408, 8),
    "routed_e64": (8192, 2048, 1408, 64),
    "routed_e256": (8192, 2048, 1408, 256),
}
DIRECTIONS = ("fwd", "dlhs", "drhs")
# bench implementation name -> the grouped_matmul kernel whose schedule work.py counts
WORK_KERNELS = {"effjax_triton": "gpu", "effjax_mosaic_gpu": "mosaic_gpu", "effjax_tpu": "tpu"}

_PRESET = flags.DEFINE_enum("preset", "gpu", ["gpu", "cpu", "work"],
                            "gpu: the published-size shapes; cpu: small shapes, no kernels timed; "
                            "work: only the counted work of each kernel's schedule (WORK_SHAPES, "
                            "random routing), no device needed.")
_SHAPES = flags.DEFINE_list("shapes", [], "Shape names to run (default: all of the preset's).")
_DISTRIBUTIONS = flags.DEFINE_list("distributions", ["balanced", "skewed"],
                                   "Group-size distributions: balanced, skewed, random "
                                   "(--preset=work defaults to random).")
_IMPLS = flags.DEFINE_list("impls", [], "Implementations to time (default: the preset's).")
_DTYPE = flags.DEFINE_enum("dtype", "", ["", "bfloat16", "float16", "float32"],
                           "Operand dtype (default: bfloat16 for gpu, float32 for cpu).")
_TILES = {d: flags.DEFINE_list(f"tiles_{d}", [], f"block_m,block_k,block_n for effjax's {d} "
                               "(default: GPU_TILING / MOSAIC_GPU_TILING)") for d in DIRECTIONS}
_WARMUP = flags.DEFINE_integer("warmup", None, "Untimed calls after compilation (default: 3 "
                                "for gpu, 1 for cpu).")
_ITERS = flags.DEFINE_integer("iters", None, "Timed calls; the median is reported (default: "
                              "20 for gpu, 5 for cpu).")
_KERNELS = flags.DEFINE_bool("kernels", True, "Time each direction of the grouped matmul "
                             "(--nokernels: only the correctness check and the MoE layers).")
_MOE_LAYER = flags.DEFINE_bool("moe_layer", True, "Also time whole MoE layers (forward + "
                               "backward) with each implementation (MOE_LAYER_IMPLS).")
_OUT = flags.DEFINE_string("out", "", "Optional JSON file for the results.")

# Whole MoE layers (effjax.moe.MoELayer, router included): name -> (tokens T, d_model D,
# expert width F, experts E, top-k). T x k equals the rows m of the gmm shape of that family.
GPU_MOE_LAYERS = {
    "mixtral": (4096, 4096, 14336, 8, 2),
    "deepseek_v2_lite": (4096, 2048, 1408, 64, 6),
}
CPU_MOE_LAYERS = {
    "mixtral_tiny": (1024, 256, 896, 8, 2),
    "deepseek_tiny": (256, 256, 128, 64, 4),
}
# layer implementation name -> (model.moe.dispatch, model.moe.gmm_impl)
MOE_LAYER_IMPLS = {
    "dropless/pallas": ("dropless", "pallas"),
    "dropless/ragged_dot": ("dropless", "ragged_dot"),
    "capacity einsum": ("capacity", "ragged_dot"),  # gmm_impl unused by capacity dispatch
}


# --------------------------------------------------------------------------- group sizes

def group_sizes(m: int, num_groups: int, distribution: str, seed: int = 0) -> np.ndarray:
  if distribution == "balanced":
    return np.array([m // num_groups + (g < m % num_groups) for g in range(num_groups)],
                    np.int32)
  if distribution == "random":  # uniform random routing: each row to one of G experts
    rng = np.random.default_rng(seed)
    return rng.multinomial(m, [1 / num_groups] * num_groups).astype(np.int32)
  if distribution == "skewed":
    rng = np.random.default_rng(seed)
    return rng.multinomial(m, rng.dirichlet([0.5] * num_groups)).astype(np.int32)
  raise ValueError(f"unknown distribution {distribution!r}")


# ------------------------------------------------------------------------ implementations
# Each takes the host group sizes and returns {direction: fn}, with one signature per
# direction (ARGS): lhs [m, k], rhs [G, k, n], dout [m, n], gs [G]; the gradient directions
# also receive the input being differentiated (VJP-based implementations need it).

def _effjax_tiling(implementation=None) -> Tiling:
  base = MOSAIC_GPU_TILING if implementation == "mosaic_gpu" else GPU_TILING
  tiles = {}
  for d in DIRECTIONS:
    default = getattr(base, {"fwd": "fwd", "dlhs": "dlhs_tiles", "drhs": "drhs_tiles"}[d])
    tiles[d] = Tiles(*map(int, _TILES[d].value)) if _TILES[d].value else default
  return Tiling(fwd=tiles["fwd"], dlhs=tiles["dlhs"], drhs=tiles["drhs"])


def _effjax(sizes, implementation=None, interpret=False):
  del sizes
  tiling = _effjax_tiling(implementation)
  kw = dict(implementation=implementation, interpret=interpret)
  return {
      "fwd": lambda lhs, rhs, gs: gmm(lhs, rhs, gs, tiling=tiling, **kw),
      # standalone gmm uses Tiling.fwd: give it the dlhs tiles
      "dlhs": lambda dout, rhs, gs, lhs: gmm(dout, rhs, gs, transpose_rhs=True,
                                             tiling=Tiling(fwd=tiling.dlhs_tiles), **kw),
      "drhs": lambda lhs, dout, gs, rhs: tgmm(lhs, dout, gs, tiling=tiling, **kw),
  }


def _by_vjp(forward):
  """Per-direction functions of forward(lhs, rhs, gs): its value and each input's VJP alone."""
  def dlhs(dout, rhs, gs, lhs):
    return jax.vjp(lambda x: forward(x, rhs, gs), lhs)[1](dout)[0]

  def drhs(lhs, dout, gs, rhs):
    return jax.vjp(lambda w: forward(lhs, w, gs), rhs)[1](dout)[0]
  return {"fwd": forward, "dlhs": dlhs, "drhs": drhs}


def _ragged_dot(sizes):
  del sizes
  return _by_vjp(lambda lhs, rhs, gs: jax.lax.ragged_dot(lhs, rhs, gs))


def _padded_einsum(sizes):
  """Capacity-style dispatch with capacity = the largest group (static, from host sizes)."""
  m = int(sizes.sum())
  capacity = max(int(sizes.max()), 1)
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  slot = np.arange(capacity)
  # [G, capacity] row of lhs per slot, or m (a zero row) for padding slots
  gather = np.where(slot[None] < sizes[:, None], starts[:, None] + slot[None], m)
  group_of_row = np.repeat(np.arange(len(sizes)), sizes)
  scatter = group_of_row * capacity + (np.arange(m) - starts[group_of_row])  # row -> slot
  gather, scatter = jnp.asarray(gather, jnp.int32), jnp.asarray(scatter, jnp.int32)

  def forward(lhs, rhs, gs):
    del gs
    x = jnp.concatenate([lhs, jnp.zeros((1, lhs.shape[1]), lhs.dtype)])[gather]  # [G, C, k]
    y = jnp.einsum("gck,gkn->gcn", x, rhs, preferred_element_type=jnp.float32)
    out = y.reshape(-1, y.shape[-1])[scatter].astype(lhs.dtype)
    return jnp.concatenate([out, jnp.zeros((lhs.shape[0] - m, out.shape[1]), out.dtype)])
  return _by_vjp(forward)


def _effjax_reference(sizes):
  return _effjax(sizes, implementation="reference")


def _in_bf16(make):
  """make's functions on bf16 copies of their float inputs, returning float32 (for kernels
  without float32 operands, checked on the CPU preset's float32 inputs)."""
  def made(sizes):
    def cast(fn):
      def run(*args):
        args = [a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a
                for a in args]
        return fn(*args).astype(jnp.float32)
      return run
    return {d: cast(fn) for d, fn in make(sizes).items()}
  return made


IMPLS = {"effjax_mosaic_gpu": functools.partial(_effjax, implementation="mosaic_gpu"),
         "effjax_triton": functools.partial(_effjax, implementation="gpu"),
         "effjax_ref": _effjax_reference, "ragged_dot": _ragged_dot,
         "padded_einsum": _padded_einsum}
KERNEL_IMPLS = ("effjax_mosaic_gpu", "effjax_triton")
ARGS = {"fwd": ("lhs", "rhs", "gs"), "dlhs": ("dout", "rhs", "gs", "lhs"),
        "drhs": ("lhs", "dout", "gs", "rhs")}


# ------------------------------------------------------------------------------- helpers

def _inputs(m, k, n, num_groups, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return dict(lhs=jax.random.normal(keys[0], (m, k), dtype),
              rhs=jax.random.normal(keys[1], (num_groups, k, n), dtype) * k ** -0.5,
              dout=jax.random.normal(keys[2], (m, n), dtype))


def _fn_and_args(direction_fns, direction, arrays):
  return direction_fns[direction], [arrays[name] for name in ARGS[direction]]


def _warmup_and_iters() -> tuple[int, int]:
  cpu = _PRESET.value == "cpu"
  warmup = _WARMUP.value if _WARMUP.value is not None else (1 if cpu else 3)
  return warmup, _ITERS.value if _ITERS.value is not None else (5 if cpu else 20)


def _time(fn, args) -> dict:
  compiled = jax.jit(fn).lower(*args).compile()
  temp = None
  try:
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    pass
  warmup, iters = _warmup_and_iters()
  jax.block_until_ready(compiled(*args))
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return dict(seconds=statistics.median(times), temp_mib=temp)


def _rel(x, ref):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  if not np.isfinite(x).all():
    return float("nan")
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def correctness_rows(impls: dict, shape, dtype):
  """Each implementation's three directions vs the float32 reference, on one skewed shape."""
  m, k, n, num_groups = shape
  sizes = group_sizes(m - 3, num_groups, "skewed")  # 3 rows past the sum
  arrays = _inputs(m, k, n, num_groups, dtype)
  arrays["gs"] = jnp.asarray(sizes)
  ref_fns = _effjax(sizes, implementation="reference")
  f32 = {name: (x.astype(jnp.float32) if name != "gs" else x) for name, x in arrays.items()}
  rows = []
  for name, make in impls.items():
    fns = make(sizes)
    row = dict(impl=name, shape=f"[{m},{k}]x[{num_groups},{k},{n}]", dtype=jnp.dtype(dtype).name)
    for d in DIRECTIONS:
      try:
        fn, args = _fn_and_args(fns, d, arrays)
        ref_fn, ref_args = _fn_and_args(ref_fns, d, f32)
        row[d] = _rel(jax.jit(fn)(*args), jax.jit(ref_fn)(*ref_args))
      except Exception as e:  # pylint: disable=broad-except
        row[d] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
    rows.append(row)
  return rows


def timing_rows(impls: dict, shapes: dict, dtype):
  rows = []
  for shape_name, (m, k, n, num_groups) in shapes.items():
    arrays = _inputs(m, k, n, num_groups, dtype)
    for distribution in _DISTRIBUTIONS.value:
      sizes = group_sizes(m, num_groups, distribution)
      arrays["gs"] = jnp.asarray(sizes)
      flops = 2 * m * k * n
      for direction in DIRECTIONS:
        itemsize = jnp.dtype(dtype).itemsize
        row = dict(shape=shape_name, m=m, k=k, n=n, groups=num_groups,
                   distribution=distribution, max_group=int(sizes.max()),
                   direction=direction, flops=flops,
                   work={name: work_row(name, m, k, n, sizes, direction, itemsize)
                         for name in impls if name in WORK_KERNELS})
        for name, make in impls.items():
          if make is None:
            row[name] = None
            continue
          try:
            fn, args = _fn_and_args(make(sizes), direction, arrays)
            r = _time(fn, args)
            r["tflops"] = flops / r["seconds"] / 1e12
            row[name] = r
          except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory)
            row[name] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")
        rows.append(row)
        print(_timing_line(row, list(impls)), flush=True)
  return rows


def _work_tiling(bench_name: str) -> Tiling:
  if bench_name == "effjax_tpu":
    return TPU_TILING
  return _effjax_tiling("mosaic_gpu" if bench_name == "effjax_mosaic_gpu" else None)


def work_row(bench_name, m, k, n, sizes, direction, itemsize) -> dict:
  """What the kernel's schedule issues for one direction (work.py), next to the ideal."""
  w = work.direction_work(direction, m, k, n, sizes, implementation=WORK_KERNELS[bench_name],
                          tiling=_work_tiling(bench_name), itemsize=itemsize)
  return dict(tiles=w.tiles, macs=w.macs, bytes=w.bytes, pad_bytes=w.pad_bytes,
              ideal_macs=w.ideal_macs, ideal_bytes=w.ideal_bytes, mac_ratio=w.mac_ratio,
              byte_ratio=w.byte_ratio)


_WORK_HEADER = ("| shape [m,k]x[G,k,n] | sizes (max group) | direction | kernel | tiles | "
                "MACs (G) | ideal MACs (G) | MACs / ideal | bytes (MiB) | pad copies (MiB) | "
                "bytes / ideal |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")


def _work_line(row, kernel) -> str:
  w = row["work"][kernel]
  cells = [f"{row['shape']} [{row['m']},{row['k']}]x[{row['groups']},{row['k']},{row['n']}]",
           f"{row['distribution']} ({row['max_group']})", row["direction"], kernel,
           str(w["tiles"]), f"{w['macs'] / 1e9:.2f}", f"{w['ideal_macs'] / 1e9:.2f}",
           f"{w['mac_ratio']:.3f}", f"{w['bytes'] / 2**20:.1f}",
           f"{w['pad_bytes'] / 2**20:.1f}", f"{w['byte_ratio']:.2f}"]
  return "| " + " | ".join(cells) + " |"


def work_rows(shapes: dict, distributions, kernels, itemsize: int):
  """The counted work of each kernel's schedule, per shape, distribution and direction."""
  rows = []
  print(_WORK_HEADER, flush=True)
  for shape_name, (m, k, n, num_groups) in shapes.items():
    for distribution in distributions:
      sizes = group_sizes(m, num_groups, distribution)
      for direction in DIRECTIONS:
        row = dict(shape=shape_name, m=m, k=k, n=n, groups=num_groups,
                   distribution=distribution, max_group=int(sizes.max()), direction=direction,
                   work={name: work_row(name, m, k, n, sizes, direction, itemsize)
                         for name in kernels})
        rows.append(row)
        for name in kernels:
          print(_work_line(row, name), flush=True)
  return rows


def _cell(r, key, fmt, convert=lambda x: x):
  if r is None:
    return "n/a"
  if "error" in r:
    return "error"
  return "-" if r.get(key) is None else format(convert(r[key]), fmt)


def _flops_unit():
  """TF/s for the GPU preset, GF/s for the CPU one (where TF/s would read 0.00x)."""
  return ("GF/s", 1e9) if _PRESET.value == "cpu" else ("TF/s", 1e12)


def _timing_header(names):
  unit = _flops_unit()[0]
  header = (["shape [m,k]x[G,k,n]", "sizes (max group)", "direction"] +
            [f"{n} {unit}" for n in names] + [f"{n} temp MiB" for n in names] +
            [f"{n} tiles, MACs/ideal, bytes/ideal" for n in names if n in WORK_KERNELS])
  return "| " + " | ".join(header) + " |\n|" + "---|" * len(header)


def _timing_line(row, names):
  scale = _flops_unit()[1]
  cells = [f"{row['shape']} [{row['m']},{row['k']}]x[{row['groups']},{row['k']},{row['n']}]",
           f"{row['distribution']} ({row['max_group']})", row["direction"]]
  cells += [_cell(row[n], "seconds", ".3g", lambda s: row["flops"] / s / scale) for n in names]
  cells += [_cell(row[n], "temp_mib", ".4g") for n in names]
  for n in names:
    if n in WORK_KERNELS:
      w = row["work"][n]
      cells.append(f"{w['tiles']}, {w['mac_ratio']:.3f}, {w['byte_ratio']:.2f}")
  return "| " + " | ".join(cells) + " |"


# -------------------------------------------------------------------------- MoE layers

def moe_layer_row(layer_name, spec, impl_name, dispatch, gmm_impl, dtype) -> dict:
  """Times one MoE layer's jitted value-and-gradient with the given dispatch / gmm_impl."""
  import flax.linen as nn  # the kernel benchmark above does not need flax
  from effjax.config import ModelConfig, MoEConfig
  from effjax.moe.layer import MoELayer

  t, d, f, e, k = spec
  name = jnp.dtype(dtype).name
  cfg = ModelConfig(d_model=d, d_ff=f, num_heads=1, num_kv_heads=1, ffn="moe", dtype=name,
                    param_dtype=name, moe=MoEConfig(num_experts=e, top_k=k, d_ff=f,
                                                    dispatch=dispatch, gmm_impl=gmm_impl))
  layer = MoELayer(cfg, train=True)
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (1, t, d), dtype)
  g = jax.random.normal(keys[1], (1, t, d), jnp.float32)
  params = nn.meta.unbox(jax.jit(layer.init)(keys[2], x)["params"])

  def forward(params, x):
    (y, _), sown = layer.apply({"params": params}, x, mutable=["aux_loss", "metrics"])
    aux = sum(jnp.sum(v) for v in jax.tree.leaves(sown.get("aux_loss", {})))
    metrics = {key: v[0] for key, v in sown["metrics"].items()}
    return jnp.sum(y.astype(jnp.float32) * g) + aux, metrics

  step = jax.value_and_grad(forward, argnums=(0, 1), has_aux=True)
  (_, metrics), _ = jax.jit(step)(params, x)
  r = _time(step, (params, x))
  flops = 18 * t * k * d * f  # 3 expert matmuls x (forward + 2 gradients), 2 T k D F each
  return dict(layer=layer_name, impl=impl_name, tokens=t, d_model=d, d_ff=f, experts=e,
              top_k=k, flops=flops, tflops=flops / r["seconds"] / 1e12,
              load_max_over_mean=float(metrics["load_max_over_mean"]),
              dropped_fraction=float(metrics["dropped_fraction"]), **r)


_MOE_LAYER_HEADER = ("| layer (T, D, F, E, k) | implementation | ms | {unit} | temp MiB | "
                     "load max/mean | dropped |\n|---|---|---:|---:|---:|---:|---:|")


def _moe_layer_line(row) -> str:
  if "error" in row:
    return f"| {row['layer']} | {row['impl']} | error: {row['error']} | | | | |"
  temp = "-" if row["temp_mib"] is None else f"{row['temp_mib']:.4g}"
  spec = ", ".join(str(row[key]) for key in ("tokens", "d_model", "d_ff", "experts", "top_k"))
  return (f"| {row['layer']} ({spec}) | {row['impl']} | {row['seconds'] * 1e3:.4g} | "
          f"{row['flops'] / row['seconds'] / _flops_unit()[1]:.3g} | {temp} | "
          f"{row['load_max_over_mean']:.2f} | {row['dropped_fraction']:.3f} |")


def main(argv):
  del argv
  device = jax.devices()[0]
  on_gpu = device.platform == "gpu"
  cpu = _PRESET.value == "cpu"
  print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, "
        f"preset {_PRESET.value}")
  results = dict(device=device.device_kind, platform=device.platform, jax=jax.__version__,
                 preset=_PRESET.value)
  dtype = jnp.dtype(_DTYPE.value or ("float32" if cpu else "bfloat16")).type
  if _PRESET.value == "work":
    shapes = {name: WORK_SHAPES[name] for name in _SHAPES.value} if _SHAPES.value else (
        WORK_SHAPES)
    print(f"\nCounted work of each kernel's schedule (pallas_kernels/grouped_matmul/work.py; "
          f"{jnp.dtype(dtype).name} operands, default tilings; bytes: blocks the kernel loads "
          "and stores, cache hits not modelled, plus api.py's padding copies):")
    distributions = _DISTRIBUTIONS.value if _DISTRIBUTIONS.present else ["random"]
    results["work"] = work_rows(shapes, distributions, list(WORK_KERNELS),
                                jnp.dtype(dtype).itemsize)
    if _OUT.value:
      from effjax import provenance  # pylint: disable=g-import-not-at-top
      provenance.write_json(_OUT.value, results)
    return

  # Correctness first: what runs here against the float32 reference (3 rows past the sum).
  hopper = on_gpu and (compat.cuda_compute_capability() or (0,))[0] == 9
  if on_gpu:
    checked = {n: IMPLS[n] for n in ("effjax_mosaic_gpu", "effjax_triton", "ragged_dot",
                                     "padded_einsum") if hopper or n != "effjax_mosaic_gpu"}
    check_shape, check_dtype = (4096, 1024, 2048, 16), dtype
  else:
    mosaic_gpu = {}
    if compat.has_gpu_interpreter():
      mosaic_gpu["effjax (Mosaic GPU, GPU interpreter, bf16 inputs)"] = _in_bf16(
          functools.partial(_effjax, implementation="mosaic_gpu",
                            interpret=compat.gpu_interpret_params(detect_races=True)))
    checked = {
        **mosaic_gpu,
        "effjax (Triton-style, interpreted)": functools.partial(
            _effjax, implementation="gpu", interpret=True),
        "effjax (Mosaic TPU, TPU simulator)": functools.partial(
            _effjax, implementation="tpu",
            interpret=compat.tpu_interpret_params(out_of_bounds_reads="raise")),
        "effjax_ref": _effjax_reference, "ragged_dot": _ragged_dot,
        "padded_einsum": _padded_einsum}
    check_shape, check_dtype = (200, 96, 80, 6), jnp.float32
  rows = correctness_rows(checked, check_shape, check_dtype)
  results["correctness"] = rows
  print("\nRelative error vs the float32 reference (||x - ref|| / ||ref||):")
  print("| implementation | shape | dtype | fwd | dlhs | drhs |\n|---|---|---|---|---|---|")
  for r in rows:
    cells = [format(r[d], ".1e") if isinstance(r[d], float) else r[d] for d in DIRECTIONS]
    print(f"| {r['impl']} | {r['shape']} | {r['dtype']} | " + " | ".join(cells) + " |")

  # Timing.
  shapes = CPU_SHAPES if cpu else GPU_SHAPES
  if _SHAPES.value:
    shapes = {name: shapes[name] for name in _SHAPES.value}
  names = _IMPLS.value or (
      ["effjax_mosaic_gpu", "effjax_triton", "effjax_ref", "ragged_dot", "padded_einsum"]
      if cpu else ["effjax_mosaic_gpu", "effjax_triton", "ragged_dot", "padded_einsum"])
  impls = {name: IMPLS[name] for name in names}
  for name in KERNEL_IMPLS:
    if name in impls and (not on_gpu or (name == "effjax_mosaic_gpu" and not hopper)):
      impls[name] = None  # the GPU kernel cannot run here (Mosaic GPU: Hopper only)
  if _KERNELS.value and not cpu and not on_gpu:
    print("\nThe gpu preset's shapes need a GPU; use --preset=cpu here.")
  elif _KERNELS.value:
    warmup, iters = _warmup_and_iters()
    print(f"\nPer direction, {jnp.dtype(dtype).name}; median of {iters} calls after "
          f"{warmup} warm-up calls; {_flops_unit()[0]} = 2 m k n / time; temp MiB = "
          "compiled temp allocation"
          + ("; effjax kernels n/a: they do not run on a CPU" if not on_gpu else "")
          + ("; Mosaic GPU n/a: not a Hopper GPU" if on_gpu and not hopper else "") + ":")
    print(_timing_header(list(impls)), flush=True)
    results["timing"] = timing_rows(impls, shapes, dtype)

  if _MOE_LAYER.value:
    layers = CPU_MOE_LAYERS if cpu else GPU_MOE_LAYERS
    if not cpu and not on_gpu:
      print("\nThe gpu preset's MoE layers need a GPU; use --preset=cpu here.")
    else:
      print(f"\nWhole MoE layer (router, dispatch, SwiGLU experts, combine), forward + backward "
            f"w.r.t. params and input, {jnp.dtype(dtype).name}; {_flops_unit()[0]} = useful "
            "expert FLOPs 18 T k D F / time; capacity factor 1.25"
            + ("; on a CPU gmm_impl=pallas runs the jnp reference" if not on_gpu else "") + ":")
      print(_MOE_LAYER_HEADER.format(unit=_flops_unit()[0]), flush=True)
      results["moe_layer"] = []
      for layer_name, spec in layers.items():
        for impl_name, (dispatch, gmm_impl) in MOE_LAYER_IMPLS.items():
          try:
            row = moe_layer_row(layer_name, spec, impl_name, dispatch, gmm_impl, dtype)
          except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory)
            row = dict(layer=layer_name, impl=impl_name,
                       error=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")
          results["moe_layer"].append(row)
          print(_moe_layer_line(row), flush=True)

  if _OUT.value:
    from effjax import provenance  # pylint: disable=g-import-not-at-top
    provenance.write_json(_OUT.value, results)  # the command and commit give every setting


if __name__ == "__main__":
  app.run(main)
