"""Attention kernels side by side: effjax's Pallas flash attention vs what JAX ships.

  python -m experiments.bench_attention                  # on a GPU: correctness, then TF/s
  python -m experiments.bench_attention --out=att.json   # also records the rows as JSON
  python -m experiments.bench_attention --seq_lens=1024,4096 --head_dims=128 --iters=50
  python -m experiments.bench_attention --work_only      # only the counted work (any machine)
  python -m experiments.bench_attention --work_only --work_impls=mosaic_gpu --work_gpu_cores=1

Implementations: effjax's pallas_kernels.attention as mosaic_gpu (the Hopper kernels: TMA
pipelines and wgmma; bf16/fp16 only) and triton (the Triton-style kernel), xla and cudnn
(`jax.nn.dot_product_attention`), and JAX's shipped Pallas Triton `mha` where it applies (no
grouped-query attention). On a machine without a GPU only the correctness side runs: each
implementation that can run here (Pallas kernels in their interpreters; the Mosaic GPU kernel
in Mosaic GPU's interpreter on jax >= 0.12, on bfloat16 inputs) against the float32
reference on small shapes, forward and gradients, as relative errors ||x - ref|| / ||ref||.

Work: first, the work each kernel schedules (pallas_kernels.attention.work, counted from the
kernels' own grids and index maps, no device needed) next to the ideal, for GQA ratios, a
small-batch backward, head_dim 96 and packed segments: programs, blocks visited, blocks
masked, MACs, K/V bytes read and all bytes moved, each as count / ideal.

Timing: --tokens total tokens per call (batch = tokens // seq_len), query heads = --width //
head_dim, GQA rows use --gqa_ratio query heads per kv head. Random normal inputs (never
zeros), --warmup calls, then the median of --iters individually timed calls. FLOPs: forward
4 B H T^2 D (halved when causal); forward + backward 3.5 x that (backward = 2.5 x forward).
"""
from __future__ import annotations

import dataclasses
import functools
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import compat
from pallas_kernels.attention import BlockSizes, attention_reference, flash_attention
from pallas_kernels.attention import work

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["1024", "2048", "4096", "8192", "16384"],
                              "Sequence lengths to time.")
_HEAD_DIMS = flags.DEFINE_list("head_dims", ["64", "128"], "Head dims to time.")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "Tokens per call (batch = tokens // seq_len).")
_WIDTH = flags.DEFINE_integer("width", 2048, "Query heads x head_dim.")
_GQA_RATIO = flags.DEFINE_integer("gqa_ratio", 4, "Query heads per kv head in the GQA rows.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16"], "Timed dtype.")
_IMPLS = flags.DEFINE_list("impls", ["mosaic_gpu", "triton", "cudnn", "xla", "jax_mha"],
                           "Implementations to time.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls after compilation.")
_ITERS = flags.DEFINE_integer("iters", 30, "Timed calls; the median is reported.")
_TIMING = flags.DEFINE_enum("timing", "auto", ["auto", "yes", "no"],
                            "auto: time only on a GPU.")
_OUT = flags.DEFINE_string("out", "", "Optional JSON file for the results.")
_WORK_ONLY = flags.DEFINE_bool("work_only", False,
                               "Print the counted work only (no kernels run).")
_WORK_IMPLS = flags.DEFINE_list("work_impls", ["mosaic_gpu", "gpu", "tpu"],
                                "Kernel families whose work is counted.")
_WORK_GPU_CORES = flags.DEFINE_integer(
    "work_gpu_cores", compat.ABSTRACT_H100[1],
    "SMs the counted GPU dK/dV grids are sized for (1: one program per key block, no split).")


# -------------------------------------------------------------------------------- work counts

def _packed_segments(batch, length, doc_len):
  """Documents of doc_len tokens packed back to back (ids increase along the sequence)."""
  return np.broadcast_to(np.arange(length) // doc_len, (batch, length)).astype(np.int32)


# (label, count_work kwargs): GQA at fixed query heads; a small-batch backward; head_dim 96;
# packed documents.
WORK_SHAPES = [
    (f"GQA G={g}", dict(batch=1, q_heads=8, kv_heads=8 // g, q_len=2048, kv_len=2048,
                        head_dim=128, causal=True))
    for g in (1, 4, 8)
] + [
    ("B=1 K=1 S=2048", dict(batch=1, q_heads=1, kv_heads=1, q_len=2048, kv_len=2048,
                            head_dim=128, causal=True)),
    ("head_dim 96", dict(batch=1, q_heads=8, kv_heads=2, q_len=2048, kv_len=2048, head_dim=96,
                         causal=True)),
    ("packed docs 300", dict(batch=1, q_heads=8, kv_heads=2, q_len=2048, kv_len=2048,
                             head_dim=128, causal=True,
                             segment_ids=_packed_segments(1, 2048, 300))),
    ("non-causal 1000", dict(batch=2, q_heads=8, kv_heads=2, q_len=1000, kv_len=1000,
                             head_dim=64)),
]


def work_rows():
  rows = []
  for impl in _WORK_IMPLS.value:
    for label, kwargs in WORK_SHAPES:
      cores = dict(gpu_cores=_WORK_GPU_CORES.value) if impl != "tpu" else {}
      for name, w in work.count_work(implementation=impl, **kwargs, **cores).items():
        rows.append(dict(impl=impl, shape=label, kernel=name, grid=list(w.grid),
                         **{f.name: getattr(w, f.name) for f in dataclasses.fields(w)
                            if f.name not in ("kernel", "grid")}))
  return rows


def _work_line(r):
  def pair(name):
    ideal = r["ideal_" + name]
    return f"{r[name]} / {ideal}" + (f" ({r[name] / ideal:.2f}x)" if ideal else "")
  def big(name):
    return f"{r[name] / 1e6:.1f}M ({r[name] / r['ideal_' + name]:.2f}x)"
  cells = [r["impl"], r["shape"], r["kernel"], "x".join(map(str, r["grid"])), str(r["programs"]),
           pair("blocks_visited"), pair("blocks_masked"), big("macs"), big("kv_bytes"),
           big("bytes_moved")]
  return "| " + " | ".join(cells) + " |"


# ----------------------------------------------------------------------------- implementations

def _effjax(q, k, v, causal, interpret=False, block_sizes=None):
  implementation = "gpu" if interpret is True or not interpret else "tpu"
  return flash_attention(q, k, v, causal=causal, implementation=implementation,
                         interpret=interpret, block_sizes=block_sizes)


def _mosaic_gpu(q, k, v, causal, interpret=False):
  return flash_attention(q, k, v, causal=causal, implementation="mosaic_gpu",
                         interpret=interpret)


def _dpa(q, k, v, causal, implementation):
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)


def _jax_mha(q, k, v, causal, interpret=False):
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental.pallas.ops.gpu import attention as jax_attention
  if q.shape[2] != k.shape[2]:
    raise NotImplementedError("no grouped-query attention")  # it would return wrong heads
  return jax_attention.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=causal,
                             interpret=interpret)


def gpu_impls():
  return {"mosaic_gpu": _mosaic_gpu, "triton": _effjax,
          "xla": functools.partial(_dpa, implementation="xla"),
          "cudnn": functools.partial(_dpa, implementation="cudnn"), "jax_mha": _jax_mha}


def interpreted_impls():
  """What runs without a GPU: the Pallas kernels in their interpreters, and XLA."""
  small = BlockSizes(32, 32)
  return {
      "effjax (Triton-style, interpreted)": functools.partial(_effjax, interpret=True,
                                                              block_sizes=small),
      "effjax (Mosaic TPU, TPU simulator)": functools.partial(
          _effjax, interpret=compat.tpu_interpret_params(out_of_bounds_reads="raise"),
          block_sizes=small),
      "jax.nn.dot_product_attention (xla)": functools.partial(_dpa, implementation="xla"),
      "jax mha (Pallas Triton, interpreted)": functools.partial(_jax_mha, interpret=True),
  }


def interpreted_16bit_impls():
  """The Mosaic GPU kernel in Mosaic GPU's interpreter (jax >= 0.12; it takes no float32),
  race detector on; XLA beside it at the same dtype."""
  impls = {"jax.nn.dot_product_attention (xla)": functools.partial(_dpa, implementation="xla")}
  if compat.has_gpu_interpreter():
    impls["effjax (Mosaic GPU, GPU interpreter)"] = functools.partial(
        _mosaic_gpu, interpret=compat.gpu_interpret_params(detect_races=True, on_race="raise"))
  return impls


# ----------------------------------------------------------------------------------- helpers

def _inputs(b, t, n, kv, d, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, n, d), dtype)
  k = jax.random.normal(keys[1], (b, t, kv, d), dtype)
  v = jax.random.normal(keys[2], (b, t, kv, d), dtype)
  dout = jax.random.normal(keys[3], (b, t, n, d), dtype)
  return q, k, v, dout


def _rel(x, ref):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  if not np.isfinite(x).all():
    return float("nan")
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _fwd_bwd(fn):
  def run(q, k, v, dout):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(dout)
  return run


def correctness_rows(impls, shapes, dtype):
  rows = []
  for (b, t, n, kv, d), causal in shapes:
    q, k, v, dout = _inputs(b, t, n, kv, d, dtype)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, dout)]
    ref_fn = lambda q, k, v, causal=causal: attention_reference(q, k, v, causal=causal)
    ref_out, ref_grads = jax.jit(_fwd_bwd(ref_fn))(*f32)
    for name, impl in impls.items():
      row = dict(impl=name, shape=f"{b}x{t}x{n}/{kv}x{d}", causal=causal, dtype=dtype.__name__)
      try:
        out, grads = jax.jit(_fwd_bwd(functools.partial(impl, causal=causal)))(q, k, v, dout)
        row.update(out=_rel(out, ref_out),
                   **{f"d{x}": _rel(g, r) for x, g, r in zip("qkv", grads, ref_grads)})
      except NotImplementedError as e:
        row.update(skipped=str(e))
      except Exception as e:  # pylint: disable=broad-except
        row.update(skipped=f"error: {type(e).__name__}: {str(e).splitlines()[0][:60]}")
      rows.append(row)
  return rows


def _median_seconds(fn, *args):
  jax.block_until_ready(fn(*args))  # compile
  for _ in range(_WARMUP.value):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_ITERS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def timing_rows(impls, dtype):
  rows = []
  for d in map(int, _HEAD_DIMS.value):
    n = _WIDTH.value // d
    for t in map(int, _SEQ_LENS.value):
      b = max(1, _TOKENS.value // t)
      for kv in (n, n // _GQA_RATIO.value):
        q, k, v, dout = _inputs(b, t, n, kv, d, dtype)
        for causal in (False, True):
          flops = 4 * b * n * t * t * d / (2 if causal else 1)
          row = dict(batch=b, seq=t, heads=n, kv_heads=kv, head_dim=d, causal=causal)
          for name in _IMPLS.value:
            fn = functools.partial(impls[name], causal=causal)
            try:
              fwd = _median_seconds(jax.jit(fn), q, k, v)
              both = _median_seconds(jax.jit(_fwd_bwd(fn)), q, k, v, dout)
              row[name] = dict(fwd_tflops=flops / fwd / 1e12,
                               fwd_bwd_tflops=3.5 * flops / both / 1e12, fwd_s=fwd, fwd_bwd_s=both)
            except NotImplementedError:
              row[name] = None  # does not apply (e.g. jax_mha with GQA)
            except Exception as e:  # pylint: disable=broad-except
              row[name] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")
          rows.append(row)
          print(_timing_line(row), flush=True)
  return rows


def _cell(r, key):
  if r is None:
    return "n/a"
  if "error" in r:
    return "error"
  return f"{r[key]:.0f}"


def _timing_header():
  names = _IMPLS.value
  header = ["B x T", "heads q/kv", "D", "causal"] + [f"{n} fwd" for n in names] + [
      f"{n} fwd+bwd" for n in names]
  return "| " + " | ".join(header) + " |\n|" + "---|" * len(header)


def _timing_line(row):
  names = _IMPLS.value
  cells = [f"{row['batch']} x {row['seq']}", f"{row['heads']}/{row['kv_heads']}",
           str(row["head_dim"]), "yes" if row["causal"] else "no"]
  cells += [_cell(row[n], "fwd_tflops") for n in names]
  cells += [_cell(row[n], "fwd_bwd_tflops") for n in names]
  return "| " + " | ".join(cells) + " |"


def main(argv):
  del argv
  device = jax.devices()[0]
  on_gpu = device.platform == "gpu"
  print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}")
  results = dict(device=device.device_kind, platform=device.platform, jax=jax.__version__)

  print(f"\nCounted work per kernel, count / ideal (bfloat16 operands; default blocks; GPU "
        f"dK/dV grids sized for {_WORK_GPU_CORES.value} SMs):")
  print("| kernels | shape | kernel | grid | programs | blocks visited | blocks masked | MACs | "
        "K/V bytes read | bytes moved |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  results["work"] = work_rows()
  for r in results["work"]:
    print(_work_line(r), flush=True)
  if _WORK_ONLY.value:
    _write(results)
    return

  # Correctness: every implementation that runs here against the float32 reference.
  if on_gpu:
    impls = {n: f for n, f in gpu_impls().items() if n in _IMPLS.value}
    shapes = [((2, 1000, 8, 8, 128), True), ((2, 1024, 8, 2, 64), False)]
    dtype = jnp.dtype(_DTYPE.value).type
  else:
    impls, dtype = interpreted_impls(), jnp.float32
    shapes = [((1, 128, 4, 4, 64), True), ((1, 100, 4, 1, 64), False)]
  rows = correctness_rows(impls, shapes, dtype)
  if not on_gpu:
    if not compat.has_gpu_interpreter():
      print(f"\nMosaic GPU kernel not run: its interpreter needs jax >= 0.12 (this is "
            f"{jax.__version__}).")
    rows += correctness_rows(interpreted_16bit_impls(), shapes, jnp.bfloat16)
  results["correctness"] = rows
  print("\nRelative error vs the float32 reference (forward output and gradients):")
  print("| implementation | B x T x Nq/Nkv x D | causal | dtype | out | dq | dk | dv |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    errs = (["n/a (" + r["skipped"] + ")"] + [""] * 3 if "skipped" in r else
            [f"{r[x]:.1e}" for x in ("out", "dq", "dk", "dv")])
    print(f"| {r['impl']} | {r['shape']} | {'yes' if r['causal'] else 'no'} | {r['dtype']} | "
          + " | ".join(errs) + " |")

  if _TIMING.value == "yes" or (_TIMING.value == "auto" and on_gpu):
    print(f"\nTF/s ({_DTYPE.value}; median of {_ITERS.value} after {_WARMUP.value} warm-up "
          f"calls; {_TOKENS.value} tokens per call):")
    print(_timing_header(), flush=True)
    results["timing"] = timing_rows(gpu_impls(), jnp.dtype(_DTYPE.value).type)
  else:
    print("\nNo GPU here: timing skipped (run this script on a GPU for the TF/s tables).")

  _write(results)


def _write(results):
  if _OUT.value:
    from effjax import provenance  # pylint: disable=g-import-not-at-top
    provenance.write_json(_OUT.value, results)  # the command and commit give every setting


if __name__ == "__main__":
  app.run(main)
