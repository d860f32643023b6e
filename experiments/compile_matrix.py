"""Every Pallas kernel through the accelerators' own compilers, compile-only: a table.

  python -m experiments.compile_matrix                       # every case on every target
  python -m experiments.compile_matrix --targets=tpu:v5e:1x1 --families=attention \\
      --out=/tmp/compile_matrix.json
  python -m experiments.compile_matrix --compare=BEFORE.json,AFTER.json   # two runs' --out

Needs Python >= 3.12 with jax[tpu,cuda12] (`make test-compile` builds `.venv-compile`). Each
case is forward and backward compiled together (jax.grad of a sum) for one device of the
target (pallas_kernels/targets.py), traced under a mesh of that device as a user compiling for
it would (the kernels read the generation from it: VMEM on TPU, shared memory on GPU): Mosaic
inside libtpu for TPU v4, v5e, v5p and v6e, Mosaic GPU and Triton inside XLA's GPU compiler
for an H100. --ptxas adds ptxas's registers and spills per Mosaic GPU kernel and, per Triton
kernel, XLA's shared memory and ptxas's spill verdict (triton_report). A case compiles, or is refused before any kernel is traced by a
rule that names itself (a ValueError / NotImplementedError from the kernel's API); anything
else is a failure. tests/test_compile_targets.py runs the same cases.
"""
from pallas_kernels import targets  # first: sets libtpu's and the CUDA plugin's variables

import dataclasses  # noqa: E402
import glob  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels import compat  # noqa: E402

BF16, F32 = jnp.bfloat16, jnp.float32
TPUS = ("tpu:v4:2x2x1", "tpu:v5e:1x1", "tpu:v5p:2x2x1", "tpu:v6e:1x1")
H100 = "gpu:h100:1"
# (target, implementation) columns of the table: Mosaic TPU on each generation, and the two
# GPU kernel families on an H100.
COLUMNS = tuple((t, "tpu") for t in TPUS) + ((H100, "mosaic_gpu"), (H100, "triton"))

# Attention: (B, T, N, K, D, dtype, options): GQA 1-8, head_dim 64-256, 512 to 32k tokens.
ATTENTION = {
    "segments_gqa4_d64_4k": (1, 4096, 8, 2, 64, BF16, dict(causal=True, segments=True)),
    "gqa4_d128_2k": (2, 2048, 16, 4, 128, BF16, dict(causal=True)),
    "mha_d96_ragged1000": (1, 1000, 8, 8, 96, BF16, dict()),
    "softcap_gqa8_d256": (1, 2048, 8, 1, 256, BF16, dict(causal=True, logit_softcap=30.0)),
    "window1024_f32_8k": (1, 8192, 4, 4, 128, F32, dict(causal=True, sliding_window=1024)),
    "window256_gqa2_noncausal": (1, 2048, 4, 2, 64, BF16, dict(sliding_window=256)),
    "causal_32k": (1, 32768, 8, 8, 128, BF16, dict(causal=True)),
    "segments_noncausal_f32_512": (2, 512, 8, 4, 64, F32, dict(segments=True)),
    "gqa8_d64_4k": (1, 4096, 16, 2, 64, BF16, dict(causal=True)),
    "gqa8_d96_2k": (1, 2048, 8, 1, 96, BF16, dict(causal=True)),
    "f32_16k": (1, 16384, 4, 4, 128, F32, dict(causal=True)),
}
# Grouped matmul: (m, k, n, experts, dtype, transpose_rhs[, local experts]), Mixtral's and
# DeepSeek-V3's expert shapes among them; the backward is tgmm (dW) and a transposed gmm (dX).
# With local experts, the call is one expert-parallel shard: the second block of that many
# experts (group_offset), the rows of every other expert zero.
GMM = {
    "shard_g64_of_256_offset": (8192, 2048, 1408, 256, BF16, False, 64),
    "g8_2048x1408": (8192, 2048, 1408, 8, BF16, False),
    "mixtral_g8_4096x14336": (8192, 4096, 14336, 8, BF16, False),
    "deepseek_g256_7168x2048": (4096, 7168, 2048, 256, BF16, False),
    "transposed_g64_2048x1408": (8192, 2048, 1408, 64, BF16, True),
    "f32_padded_g6_1024x1000": (4096, 1024, 1000, 6, F32, False),
}
# The fused Monarch layer: (tokens, in, out, nblocks), GPT-2's MLP shapes and square layers.
MONARCH = {
    "gpt2_up_768x3072": (8192, 768, 3072, 4), "gpt2_down_3072x768": (8192, 3072, 768, 4),
    "square_1024": (8192, 1024, 1024, 4), "square_2048": (8192, 2048, 2048, 4),
    "square_4096": (8192, 4096, 4096, 4),
}
FAMILIES = {"attention": ATTENTION, "gmm": GMM, "monarch": MONARCH}
# The kernel APIs' names for the column's implementation.
_API_NAMES = {"attention": {"tpu": "tpu", "mosaic_gpu": "mosaic_gpu", "triton": "gpu"},
              "gmm": {"tpu": "tpu", "mosaic_gpu": "mosaic_gpu", "triton": "gpu"},
              "monarch": {"tpu": "tpu", "mosaic_gpu": "mosaic_gpu"}}


def _attention(case, implementation):
  from pallas_kernels.attention import api  # pylint: disable=g-import-not-at-top
  b, t, n, kv, d, dtype, options = ATTENTION[case]
  options = dict(options)
  with_segments = options.pop("segments", False)

  def loss(q, k, v, segment_ids):
    out = api.flash_attention(q, k, v, segment_ids=segment_ids if with_segments else None,
                              implementation=implementation, **options)
    return jnp.sum(out.astype(jnp.float32))
  shapes = [((b, t, n, d), dtype), ((b, t, kv, d), dtype), ((b, t, kv, d), dtype),
            ((b, t), jnp.int32)]
  return loss, shapes, (0, 1, 2)


def _gmm(case, implementation):
  from pallas_kernels.grouped_matmul import api  # pylint: disable=g-import-not-at-top
  m, k, n, experts, dtype, transpose_rhs, *local = GMM[case]
  local = local[0] if local else experts
  offset = None if local == experts else jnp.int32(local)

  def loss(lhs, rhs):
    sizes = jnp.full((experts,), m // experts, jnp.int32)
    out = api.gmm(lhs, rhs, sizes, transpose_rhs=transpose_rhs, group_offset=offset,
                  implementation=implementation)
    return jnp.sum(out.astype(jnp.float32))
  rhs = (local, n, k) if transpose_rhs else (local, k, n)
  return loss, [((m, k), dtype), (rhs, dtype)], (0, 1)


def _monarch(case, implementation):
  from effjax.layers.monarch import monarch_shapes  # pylint: disable=g-import-not-at-top
  from pallas_kernels.monarch import api  # pylint: disable=g-import-not-at-top
  tokens, n_in, n_out, nblocks = MONARCH[case]
  w1_shape, w2_shape = monarch_shapes(n_in, n_out, nblocks)

  def loss(x, w1, w2):
    return jnp.sum(api.monarch(x, w1, w2, n_out, implementation=implementation)
                   .astype(jnp.float32))
  return loss, [((tokens, n_in), BF16), (w1_shape, BF16), (w2_shape, BF16)], (0, 1, 2)


_BUILDERS: dict[str, Callable[..., Any]] = {"attention": _attention, "gmm": _gmm,
                                            "monarch": _monarch}


@dataclasses.dataclass
class Outcome:
  status: str  # "compiled", "refused" (by a stated rule, before any kernel), "failed", "n/a"
  seconds: float = 0.0
  detail: str = ""  # the rule or the error's first line
  flops: float | None = None  # the compiler's cost analysis, where it gives one
  temp_bytes: int | None = None

  @property
  def cell(self) -> str:
    if self.status == "compiled":
      return f"compiled ({self.seconds:.1f} s)"
    return self.status


def compile_case(family: str, case: str, target_name: str, implementation: str) -> Outcome:
  """Compiles one case's forward + backward for one device of the target."""
  api_name = _API_NAMES[family].get(implementation)
  if api_name is None:
    return Outcome("n/a", detail=f"no {implementation} kernel for {family}")
  target = targets.get(target_name)
  sharding = jax.sharding.SingleDeviceSharding(target.devices[0])
  loss, shapes, argnums = _BUILDERS[family](case, api_name)
  args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]
  start = time.perf_counter()
  # Traced under a mesh of the target's device, as a user compiling for it would: the kernels
  # read the generation (TPU VMEM budget, GPU compute capability) from it, and the Triton
  # lowering needs it (under an abstract H100 mesh alone it asks for a live "gpu" backend).
  context = jax.set_mesh(jax.sharding.Mesh(target.devices[:1], ("one",)))
  try:
    with context:
      lowered = jax.jit(jax.grad(loss, argnums=argnums)).lower(*args)
  except (ValueError, NotImplementedError) as rule:
    return Outcome("refused", time.perf_counter() - start, " ".join(str(rule).split()))
  except Exception as e:  # pylint: disable=broad-except  (a lowering failure, reported)
    return Outcome("failed", time.perf_counter() - start,
                   f"lowering: {type(e).__name__}: {str(e).strip().splitlines()[0]}")
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  (the compiler's verdict, reported)
    lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
    # the first line, and the VMEM / shared-memory figure where the compiler gives one
    figure = next((l for l in lines if "Scoped allocation" in l or "exceeds" in l), "")
    return Outcome("failed", time.perf_counter() - start,
                   " ".join([lines[0], figure[figure.find("Scoped allocation"):]]).strip())
  cost = compiled.cost_analysis() or {}
  memory = compiled.memory_analysis()
  return Outcome("compiled", time.perf_counter() - start, flops=cost.get("flops"),
                 temp_bytes=getattr(memory, "temp_size_in_bytes", None))


def _compile_in_subprocess(family: str, case: str, implementation: str, env: dict[str, str]
                           ) -> tuple[str, str]:
  """(status, stdout + stderr) of compile_case in a fresh process with these variables: a
  kernel compiled before in this one would be cached and not compiled (or reported) again."""
  code = ("import sys; from experiments import compile_matrix as m; "
          f"o = m.compile_case({family!r}, {case!r}, {H100!r}, {implementation!r}); "
          "print('STATUS', o.status, o.detail)")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, **env,
             PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
  proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                        text=True, errors="replace", timeout=600, check=False)
  found = re.search(r"^STATUS (.*)$", proc.stdout, re.M)
  return (found.group(1) if found else "no status"), proc.stdout + proc.stderr


def ptxas_report(family: str, case: str) -> list[dict[str, int]]:
  """ptxas's own report for each Mosaic GPU kernel of a case compiled for an H100, in lowering
  order (Mosaic GPU runs ptxas while lowering; MOSAIC_GPU_DUMP_PTXAS=1 makes it print -v):
  registers per thread, spill stores and loads (bytes), static shared memory (Mosaic GPU's
  tiles are dynamic shared memory, checked against the H100's limit by the compile itself)."""
  status, output = _compile_in_subprocess(family, case, "mosaic_gpu",
                                          {"MOSAIC_GPU_DUMP_PTXAS": "1"})
  if not status.startswith("compiled"):
    return []
  kernels, spills = [], None
  for line in output.splitlines():
    found = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if found:
      spills = tuple(int(g) for g in found.groups())
    found = re.search(r"ptxas info\s*: Used (\d+) registers.*?(\d+) bytes smem", line)
    if found and spills is not None:
      kernels.append(dict(registers=int(found.group(1)), spill_stores=spills[0],
                          spill_loads=spills[1], static_smem=int(found.group(2))))
      spills = None
  return kernels


def triton_report(family: str, case: str) -> dict[str, Any]:
  """What XLA's GPU compiler says of a case's Triton kernels for an H100. XLA compiles them to
  PTX and runs ptxas inside the compile without printing ptxas's report, so:
    kernels  [{name, grid, threads, smem}] from XLA's thunk sequence (its dump), each Triton
             kernel's launch and the shared memory it was compiled to use;
    spills   whether ptxas spilled registers in any of them: the same compile again with
             --xla_gpu_fail_ptx_compilation_on_register_spilling, which XLA checks on ptxas's
             output (None when the first compile did not succeed).
  Registers per thread are not in either; reading them needs the PTX, which XLA keeps."""
  with tempfile.TemporaryDirectory() as dump:
    status, _ = _compile_in_subprocess(family, case, "triton",
                                       {"XLA_FLAGS": f"--xla_dump_to={dump}"})
    kernels = []
    for path in glob.glob(os.path.join(dump, "*thunk_sequence.txt")):
      with open(path, encoding="utf-8") as f:
        for line in f:
          found = re.search(r"kCustomKernel .*\] (effjax_\w+) grid: \[([\d, ]+)\] threads: "
                            r"\[([\d, ]+)\]\s+shared_memory: (\d+) bytes", line)
          if found:
            kernels.append(dict(name=found.group(1), grid=found.group(2),
                                threads=found.group(3), smem=int(found.group(4))))
  if not status.startswith("compiled"):
    return dict(kernels=kernels, spills=None)
  status, _ = _compile_in_subprocess(
      family, case, "triton",
      {"XLA_FLAGS": "--xla_gpu_fail_ptx_compilation_on_register_spilling=true"})
  return dict(kernels=kernels, spills=not status.startswith("compiled"))


def compare(before_path: str, after_path: str) -> list[str]:
  """Markdown rows comparing two results files (--out) per column: how many cases each
  compiled, refused or failed, and the compile seconds of the cases both compiled."""
  import json  # pylint: disable=g-import-not-at-top
  runs, commits = [], []
  for path in (before_path, after_path):
    with open(path, encoding="utf-8") as f:
      results = json.load(f)
    runs.append({(r["family"], r["case"], r["target"], r["implementation"]): r
                 for r in results["rows"]})
    commits.append(results.get("provenance", {}).get("git", {}).get("commit", "?")[:7])
  lines = [f"| column | {commits[0]}: compiled / refused / failed | {commits[1]}: compiled / "
           f"refused / failed | cases compiled in both | seconds {commits[0]} | seconds "
           f"{commits[1]} |", "|---|---|---|---:|---:|---:|"]
  columns = sorted({k[2:] for run in runs for k in run})
  for target, implementation in columns:
    counts, both = [], []
    for run in runs:
      statuses = [r["status"] for k, r in run.items() if k[2:] == (target, implementation)]
      counts.append(" / ".join(str(statuses.count(s)) for s in ("compiled", "refused", "failed"))
                    if statuses else "not in the run")
    for key, r in runs[1].items():
      old = runs[0].get(key)
      if key[2:] == (target, implementation) and r["status"] == "compiled" and (
          old and old["status"] == "compiled"):
        both.append((old["seconds"], r["seconds"]))
    lines.append(f"| {target} {implementation} | {counts[0]} | {counts[1]} | {len(both)} | "
                 f"{sum(b for b, _ in both):.0f} | {sum(a for _, a in both):.0f} |")
  return lines


def all_cases(families=tuple(FAMILIES)):
  return [(f, c) for f in families for c in FAMILIES[f]]


# The command line's flags, defined only when run as a script: tests import this module
# beside other entry points that define flags of the same names (--out, --preset).
_TARGETS = None
_FAMILIES = None
_OUT = None
_PTXAS = None
_COMPARE = None


def define_flags():
  global _TARGETS, _FAMILIES, _OUT, _PTXAS, _COMPARE  # pylint: disable=global-statement
  _TARGETS = flags.DEFINE_list("targets", [], "Restrict to these targets (default: all columns).")
  _FAMILIES = flags.DEFINE_list("families", list(FAMILIES), "Kernel families.")
  _OUT = flags.DEFINE_string("out", "", "Optional JSON file for the table and its provenance.")
  _PTXAS = flags.DEFINE_bool("ptxas", False, "Also print ptxas's registers and spills per Mosaic "
                             "GPU kernel, and XLA's shared memory and ptxas's spill verdict per "
                             "Triton kernel, of every case (H100).")
  _COMPARE = flags.DEFINE_list("compare", [], "BEFORE.json,AFTER.json (--out files): print "
                               "each column's outcomes and compile seconds side by side; "
                               "compiles nothing.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _COMPARE.value:
    if len(_COMPARE.value) != 2:
      raise SystemExit(f"--compare takes BEFORE.json,AFTER.json, got {_COMPARE.value}")
    print("\n".join(compare(*_COMPARE.value)))
    return
  unknown = sorted(set(_FAMILIES.value) - set(FAMILIES))
  if unknown:
    raise SystemExit(f"--families: unknown {unknown}; known: {sorted(FAMILIES)}")
  known = sorted({t for t, _ in COLUMNS})
  unknown = sorted(set(_TARGETS.value) - set(known))
  if unknown:  # a bad name, or one the matrix has no column for: one line, before compiling
    raise SystemExit(f"--targets: {unknown} not among the matrix's targets {known}")
  columns = [c for c in COLUMNS if not _TARGETS.value or c[0] in _TARGETS.value]
  print(f"jax {jax.__version__}; times are this host's compile times (compile-only)")
  print("| kernel | case | " + " | ".join(f"{t} {i}" for t, i in columns) + " |")
  print("|---|---|" + "---|" * len(columns))
  rows, notes = [], []
  for family, case in all_cases(_FAMILIES.value):
    cells = []
    for target_name, implementation in columns:
      outcome = compile_case(family, case, target_name, implementation)
      rows.append(dict(family=family, case=case, target=target_name,
                       implementation=implementation, **dataclasses.asdict(outcome)))
      cells.append(outcome.cell)
      if outcome.status in ("refused", "failed"):
        notes.append(f"{family}/{case} on {target_name} {implementation}: {outcome.status}: "
                     f"{outcome.detail[:300]}")
    print(f"| {family} | {case} | " + " | ".join(cells) + " |", flush=True)
  for note in notes:
    print("-", note)
  ptxas = {}
  if _PTXAS.value:
    print("\n| kernel | case | Mosaic GPU kernels | registers / thread | spill stores, loads (bytes) |")
    print("|---|---|---:|---|---|")
    for family, case in all_cases(_FAMILIES.value):
      report = ptxas_report(family, case)
      ptxas[f"{family}/{case}"] = report
      if report:
        registers = ", ".join(str(k["registers"]) for k in report)
        spills = "; ".join(f"{k['spill_stores']}, {k['spill_loads']}" for k in report)
        print(f"| {family} | {case} | {len(report)} | {registers} | {spills} |", flush=True)
  triton = {}
  if _PTXAS.value and any(i == "triton" for _, i in columns):
    print("\n| kernel | case | Triton kernel: grid, threads, shared memory (XLA) | ptxas spilled |")
    print("|---|---|---|---|")
    for family, case in all_cases(_FAMILIES.value):
      if family == "monarch":  # no Triton kernel
        continue
      report = triton_report(family, case)
      triton[f"{family}/{case}"] = report
      kernels = "; ".join(f"{k['name']} [{k['grid']}] x {k['threads'].split(',')[0]}, "
                          f"{k['smem'] // 1024} KiB" for k in report["kernels"])
      spilled = {None: "not compiled", True: "yes", False: "no"}[report["spills"]]
      print(f"| {family} | {case} | {kernels} | {spilled} |", flush=True)
  if _OUT.value:
    from effjax import provenance  # pylint: disable=g-import-not-at-top
    provenance.write_json(_OUT.value, {"rows": rows, "ptxas": ptxas, "triton": triton},
                          {"targets": [c[0] for c in columns], "families": _FAMILIES.value})


if __name__ == "__main__":
  define_flags()
  app.run(main)
