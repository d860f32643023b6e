"""One linear layer, forward + backward: dense vs Monarch, time ratio beside FLOP ratio.

  python -m experiments.bench_monarch                                   # the full grid (a GPU)
  python -m experiments.bench_monarch --widths=1024,2048 --pairs=768x3072,3072x768 \
      --nblocks=4 --max_gflop=300 --reps=5 --out=/tmp/bench_monarch.json          # 2 CPUs

For each dtype and layer shape (`--shapes` of each `--widths` d: `square` d -> d, `up4`
d -> 4d, `down4` 4d -> d; plus the explicit `--pairs` in x out, by default GPT-2 small's MLP,
768 -> 3072 and 3072 -> 768) it times one layer's forward and backward (y, then dx and the
weight gradients for a cotangent dy: the work of a training step) over `--tokens` tokens, for
the dense layer and, with each `--nblocks`, for each Monarch implementation in `--impls`:

  xla        monarch_multiply, the copy-free layout the layer uses;
  reference  monarch_multiply_reference, the first formulation, differentiated by JAX;
  dots       not a layer: the six batched matmuls of `xla` alone, on operands already
             block-major, without the stride permutation or any layout pass: what the
             blocks' smaller matmuls cost next to dense's. In float32 any layout built from
             XLA's batched dots costs at least this. (Not a floor for bfloat16 on a CPU, which
             multiplies it in float32: the layer converts in its layout passes, these
             matmuls convert on their own, and ran slower than the layer there.);
  pallas     the fused kernels (pallas_kernels.monarch, the platform's own: Mosaic TPU on a
             TPU; Mosaic GPU on a Hopper GPU, bfloat16/float16 only, and only shapes its
             rules allow, mosaic_gpu.plan: other cases print and record why they are
             skipped). Elsewhere, or for float32 on a GPU, --impls=pallas is refused before
             anything is timed (a CPU could only interpret the kernels).

The implementations of one case are timed in turns (dense, xla, reference, dense, ...), so
a change in the machine's load hits them alike; the median of `--reps` turns is reported.
Weights and activations are both in the dtype. Beside each time ratio: the analytic FLOP
ratio (Monarch / dense = params / (in x out)), `XLA flops` (the compiled program's own count,
a check that nothing hidden changes the work), `bytes_ratio` (the compiled program's bytes
accessed over dense's: memory traffic per the backend's or the kernel's own work count;
for Mosaic GPU, whose custom calls XLA cannot count, the kernels' work count,
pallas_kernels.monarch.common.work(kernel="mosaic_gpu"), forward + backward),
and `copies`: the passes in the optimised
program that only move a full activation (effjax.layers.monarch.activation_copies; the
dense layer has none). `ratio of ratios` = time ratio / FLOP ratio: 1 means Monarch runs at
dense's FLOP rate. The load average is printed and recorded, since on a shared machine it
moves the absolute times (ratios from one run are what to compare). --out writes the rows
as JSON with provenance (commit, versions, device, command, date).
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from effjax import provenance
from effjax.layers.monarch import (activation_copies, monarch_multiply,
                                   monarch_multiply_reference, monarch_param_count,
                                   monarch_shapes)

# The command line's flags, defined only when run as a script: tests import this module
# beside other entry points that define flags of the same names (--out, --preset).
_WIDTHS = None
_SHAPES = None
_PAIRS = None
_NBLOCKS = None
_DTYPES = None
_IMPLS = None
_TOKENS = None
_REPS = None
_MAX_GFLOP = None
_OUT = None


def define_flags():
  global _WIDTHS, _SHAPES, _PAIRS, _NBLOCKS, _DTYPES, _IMPLS, _TOKENS, _REPS, _MAX_GFLOP, _OUT
  _WIDTHS = flags.DEFINE_list("widths", ["512", "1024", "2048", "4096"], "Model widths d.")
  _SHAPES = flags.DEFINE_list("shapes", ["square", "up4"], "square (d->d), up4 (d->4d), "
                              "down4 (4d->d).")
  _PAIRS = flags.DEFINE_list("pairs", ["768x3072", "3072x768"], "Extra layer shapes INxOUT.")
  _NBLOCKS = flags.DEFINE_list("nblocks", ["2", "4", "8"], "Monarch block counts.")
  _DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
  _IMPLS = flags.DEFINE_list("impls", ["xla", "dots", "reference"], "Monarch implementations: "
                             "xla, dots (xla's batched matmuls alone), reference, pallas "
                             "(a TPU, or a Hopper GPU in bf16/fp16).")
  _TOKENS = flags.DEFINE_integer("tokens", 8192, "Tokens per batch (rows of x).")
  _REPS = flags.DEFINE_integer("reps", 10, "Timed turns per case (after one warm-up turn).")
  _MAX_GFLOP = flags.DEFINE_float("max_gflop", 0.0, "Skip cases whose dense forward+backward "
                                  "exceeds this many GFLOP (0: no limit); for slow devices.")
  _OUT = flags.DEFINE_string("out", "", "Optional JSON file for the results.")

SHAPES = {"square": (1, 1), "up4": (1, 4), "down4": (4, 1)}


def _reference_multiply(x, w1, w2, out_features):
  k, _, p = w1.shape
  x = jnp.pad(x, ((0, 0), (0, k * p - x.shape[-1])))
  return monarch_multiply_reference(x, w1, w2)[:, :out_features]


def _pallas_multiply(x, w1, w2, out_features):
  from pallas_kernels.monarch import monarch  # pylint: disable=g-import-not-at-top
  return monarch(x, w1, w2, out_features)


MONARCH_IMPLS = {"xla": monarch_multiply, "reference": _reference_multiply,
                 "pallas": _pallas_multiply}
IMPLS = (*MONARCH_IMPLS, "dots")


def block_dots(x_KTP, dy_KTS, w1_KQP, w2_KSR):
  """y, dx, dw1, dw2 blocks: monarch_multiply's six batched matmuls and nothing else (the
  intermediate is fed to the second factor unpermuted: same shapes, same work)."""
  def matmul(a, b, contract):
    dims = (contract, ((0,), (0,)))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(a.dtype)
  h_KTQ = matmul(x_KTP, w1_KQP, ((2,), (2,)))
  y_KTS = matmul(h_KTQ, w2_KSR, ((2,), (2,)))
  dh_KTQ = matmul(dy_KTS, w2_KSR, ((2,), (1,)))
  dw2 = matmul(dy_KTS, h_KTQ, ((1,), (1,)))
  dw1 = matmul(dh_KTQ, x_KTP, ((1,), (1,)))
  dx_KTP = matmul(dh_KTQ, w1_KQP, ((2,), (1,)))
  return y_KTS, dx_KTP, dw1, dw2


def compile_block_dots(tokens, factors):
  """(a zero-argument call of the compiled block_dots, XLA's flops, bytes, copies)."""
  (k, _, p), (_, s, _) = (f.shape for f in factors)
  dtype = factors[0].dtype
  x_KTP, dy_KTS = (jnp.ones((k, tokens, n), dtype) for n in (p, s))
  compiled = jax.jit(block_dots).lower(x_KTP, dy_KTS, *factors).compile()
  flops, moved = _cost(compiled)
  copies = activation_copies(compiled.as_text(), tokens * min(k * p, k * s))
  return functools.partial(compiled, x_KTP, dy_KTS, *factors), flops, moved, len(copies)


def _forward_backward(multiply, dy, x, *weights):
  y, vjp = jax.vjp(multiply, x, *weights)
  return y, vjp(dy)


def layer_shapes(shapes, widths, pairs) -> list[tuple[str, int, int]]:
  """[(name, n_in, n_out)] from the shape names x widths and the INxOUT pairs."""
  out = []
  for shape in shapes:
    if shape not in SHAPES:
      raise app.UsageError(f"--shapes: unknown shape {shape!r}; choose from {list(SHAPES)}")
    a, b = SHAPES[shape]
    out += [(shape, a * w, b * w) for w in widths]
  for pair in pairs:
    try:
      n_in, n_out = (int(v) for v in pair.lower().split("x"))
    except ValueError:
      raise app.UsageError(f"--pairs: {pair!r} is not INxOUT (e.g. 768x3072)") from None
    out.append(("pair", n_in, n_out))
  return out


def _cost(compiled):
  """(XLA's flop count, its bytes accessed), None where the backend does not say."""
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost["flops"]) if cost and "flops" in cost else None
    moved = float(cost["bytes accessed"]) if cost and "bytes accessed" in cost else None
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    flops = moved = None
  return flops, moved


def compile_case(multiply, x, weights, dy):
  """(compiled forward+backward, XLA's flop count, XLA's bytes accessed (None where the
  backend does not say), activation copies). A Pallas kernel's counts are its own
  CostEstimate (pallas_kernels.monarch.common.work)."""
  compiled = jax.jit(functools.partial(_forward_backward, multiply)).lower(
      dy, x, *weights).compile()
  flops, moved = _cost(compiled)
  n_in, n_out = x.shape[-1], dy.shape[-1]
  copies = activation_copies(compiled.as_text(), x.shape[0] * min(n_in, n_out))
  return compiled, flops, moved, len(copies)


def mosaic_gpu_refusal(n_in: int, n_out: int, k: int, dtype) -> str | None:
  """Why the Mosaic GPU kernels cannot run this layer (their shape rules), or None."""
  from pallas_kernels.monarch import mosaic_gpu  # pylint: disable=g-import-not-at-top
  w1_shape, w2_shape = monarch_shapes(n_in, n_out, k)
  try:
    mosaic_gpu.plan(n_in, n_out, w1_shape, w2_shape, dtype)
  except (ValueError, NotImplementedError) as e:
    return str(e)
  return None


def mosaic_gpu_bytes(tokens: int, n_in: int, n_out: int, k: int, dtype) -> int:
  """Bytes the Mosaic GPU kernels move for one forward + backward (their work count), on the
  padded widths they see (k p in, k s out)."""
  from pallas_kernels.monarch import common  # pylint: disable=g-import-not-at-top
  w1_shape, w2_shape = monarch_shapes(n_in, n_out, k)
  width_in, width_out = k * w1_shape[2], k * w2_shape[1]
  return sum(common.work(tokens, width_in, width_out, w1_shape, w2_shape,
                         jnp.dtype(dtype).itemsize, direction, kernel="mosaic_gpu")[1]
             for direction in ("forward", "backward"))


def time_in_turns(calls: dict, reps: int) -> dict:
  """Median seconds of each zero-argument call, the calls run in turns."""
  for call in calls.values():
    jax.block_until_ready(call())
  times = {name: [] for name in calls}
  for _ in range(reps):
    for name, call in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def main(argv):
  del argv
  for impl in _IMPLS.value:
    if impl not in IMPLS:
      raise app.UsageError(f"--impls: unknown {impl!r}; choose from {list(IMPLS)}")
  kernels = {}  # dtype -> the fused kernel family --impls=pallas runs
  if "pallas" in _IMPLS.value:
    from pallas_kernels.monarch import default_implementation  # pylint: disable=g-import-not-at-top
    for dtype_name in _DTYPES.value:
      try:
        kernels[dtype_name] = default_implementation(dtype=jnp.dtype(dtype_name))
      except NotImplementedError as e:
        raise app.UsageError(f"--impls=pallas with --dtypes={dtype_name}: {e}") from None
  cases = layer_shapes(_SHAPES.value, [int(w) for w in _WIDTHS.value], _PAIRS.value)
  nblocks = [int(k) for k in _NBLOCKS.value]
  for n_in, n_out, k in ((i, o, k) for _, i, o in cases for k in nblocks):
    monarch_shapes(n_in, n_out, k, where="--nblocks")  # bad sizes fail before any timing
  tokens = _TOKENS.value
  device = jax.devices()[0]
  load_before = os.getloadavg()
  print(f"load average before: {load_before[0]:.1f} (1 min), {os.cpu_count()} CPUs",
        flush=True)
  rows = []
  for dtype_name in _DTYPES.value:
    dtype = jnp.dtype(dtype_name)
    for shape, n_in, n_out in cases:
      dense_flops = 6.0 * tokens * n_in * n_out
      if _MAX_GFLOP.value and dense_flops > _MAX_GFLOP.value * 1e9:
        print(f"skip {dtype_name} {n_in}x{n_out}: {dense_flops / 1e9:.0f} GFLOP > --max_gflop",
              flush=True)
        continue
      kx, kd, kw = jax.random.split(jax.random.key(0), 3)
      x = jax.random.normal(kx, (tokens, n_in), dtype)
      dy = jax.random.normal(kd, (tokens, n_out), dtype)
      w = (jax.random.normal(kw, (n_in, n_out)) / n_in ** 0.5).astype(dtype)
      dense, dense_xla, dense_bytes, dense_copies = compile_case(jnp.matmul, x, (w,), dy)
      for k in nblocks:
        w1_shape, w2_shape = monarch_shapes(n_in, n_out, k)
        k1, k2 = jax.random.split(jax.random.fold_in(kw, k))
        factors = (jax.random.normal(k1, w1_shape, dtype), jax.random.normal(k2, w2_shape, dtype))
        calls = {"dense": functools.partial(dense, dy, x, w)}
        stats, skipped = {}, {}
        for impl in _IMPLS.value:
          if impl == "pallas" and kernels[dtype_name] == "mosaic_gpu":
            reason = mosaic_gpu_refusal(n_in, n_out, k, dtype)
            if reason:
              print(f"skip pallas {dtype_name} {n_in}x{n_out} nblocks {k}: {reason}",
                    flush=True)
              skipped[impl] = reason
              continue
          if impl == "dots":
            call, xla_flops, moved, copies = compile_block_dots(tokens, factors)
            calls[impl], stats[impl] = call, (xla_flops, moved, copies)
            continue
          multiply = functools.partial(MONARCH_IMPLS[impl], out_features=n_out)
          compiled, xla_flops, moved, copies = compile_case(multiply, x, factors, dy)
          if impl == "pallas" and kernels[dtype_name] == "mosaic_gpu":
            moved = mosaic_gpu_bytes(tokens, n_in, n_out, k, dtype)
          calls[impl] = functools.partial(compiled, dy, x, *factors)
          stats[impl] = (xla_flops, moved, copies)
        seconds = time_in_turns(calls, _REPS.value)
        flop_ratio = monarch_param_count(n_in, n_out, k) / (n_in * n_out)
        row = dict(dtype=dtype_name, shape=shape, n_in=n_in, n_out=n_out, nblocks=k,
                   tokens=tokens, flop_ratio=flop_ratio, dense_ms=seconds["dense"] * 1e3,
                   dense_copies=dense_copies,
                   dense_tflops_per_s=dense_flops / seconds["dense"] / 1e12)
        for impl, reason in skipped.items():
          row[impl] = dict(skipped=reason)
        for impl, (xla_flops, moved, copies) in stats.items():
          time_ratio = seconds[impl] / seconds["dense"]
          row[impl] = dict(ms=seconds[impl] * 1e3, time_ratio=time_ratio, copies=copies,
                           ratio_of_ratios=time_ratio / flop_ratio,
                           xla_flop_ratio=(xla_flops / dense_xla
                                           if xla_flops and dense_xla else None),
                           bytes_ratio=moved / dense_bytes if moved and dense_bytes else None)
        rows.append(row)
        print(json.dumps(row), flush=True)
  load_after = os.getloadavg()

  print(f"\ndevice: {device.device_kind} ({device.platform}), jax {jax.__version__}; {tokens} "
        f"tokens, forward + backward (y, dx, dW), median of {_REPS.value} turns; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after ({os.cpu_count()} CPUs)")
  impls = list(_IMPLS.value)
  head = "".join(f" {i} ms | {i} time ratio | {i} ratio of ratios | {i} copies | {i} bytes "
                 "ratio |" for i in impls)
  print(f"| dtype | in x out | nblocks | FLOP ratio | dense ms |{head}")
  print("|---|---|---:|---:|---:|" + "---:|---:|---:|---:|---:|" * len(impls))
  for r in rows:
    cells = "".join(" skipped | - | - | - | - |" if "skipped" in r[i] else
                    f" {r[i]['ms']:.1f} | {r[i]['time_ratio']:.3f} | "
                    f"{r[i]['ratio_of_ratios']:.2f} | {r[i]['copies']} | "
                    + (f"{r[i]['bytes_ratio']:.2f}" if r[i]["bytes_ratio"] else "-") + " |"
                    for i in impls)
    print(f"| {r['dtype']} | {r['n_in']} x {r['n_out']} | {r['nblocks']} | "
          f"{r['flop_ratio']:.3f} | {r['dense_ms']:.1f} |{cells}")
  if _OUT.value:
    config = dict(widths=_WIDTHS.value, shapes=_SHAPES.value, pairs=_PAIRS.value,
                  nblocks=nblocks, dtypes=_DTYPES.value, impls=impls, tokens=tokens,
                  reps=_REPS.value, max_gflop=_MAX_GFLOP.value)
    provenance.write_json(_OUT.value, dict(rows=rows, load_average_before=load_before,
                                           load_average_after=load_after), config)


if __name__ == "__main__":
  define_flags()
  app.run(main)
