"""configs/pod.py's configs sized by each target's own compiler, compile-only: one table.

  python -m experiments.pod_matrix --out=experiments/results/pod_matrix_COMMIT.json
  python -m experiments.pod_matrix --table=main        # or changes (CHANGES), or all
  python -m experiments.pod_matrix --rows=llama3_8b    # rows whose name contains a pattern
  python -m experiments.pod_matrix --list              # the rows and their commands

Each row is `experiments.aot_check --target=... --json=...` in its own subprocess (a fresh
compiler per row; a refusal is a row, not a stop): every variant of configs/pod.py at the mesh
`pod.SIZED_FOR` gives it on a v5p 4x4x4 slice, a v6e 8x8 slice and 8 H100s, then what changes
with remat, expert parallelism and the Pallas kernels (CHANGES). Needs
jax[tpu] and jax[cuda12] (`make test-compile` builds .venv-compile). Every figure is the
compiler's estimate, not a measurement; --out writes them with their provenance, and
`python -m experiments.reproduce --results=... --rerun --keys=needed_bytes,state_bytes,flops`
checks them at the recorded commit.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
from configs import pod  # noqa: E402  pylint: disable=g-import-not-at-top

# absl flags, defined only when run as a script (tests import this module beside others that
# define --out)
_OUT = _ROWS = _TABLE = _LIST = _TIMEOUT = None


def define_flags() -> None:
  global _OUT, _ROWS, _TABLE, _LIST, _TIMEOUT  # pylint: disable=global-statement
  _OUT = flags.DEFINE_string("out", "", "JSON file for the rows and their provenance.")
  _ROWS = flags.DEFINE_list("rows", [], "Only rows whose name contains one of these.")
  _TABLE = flags.DEFINE_enum("table", "all", ["all", "main", "changes"], "The main table "
                             "(every variant on every target), the CHANGES rows, or both.")
  _LIST = flags.DEFINE_bool("list", False, "Print the rows' commands and exit.")
  _TIMEOUT = flags.DEFINE_integer("timeout", 1800, "Seconds one row may compile.")

GIB = 2.0 ** 30

# What changes with remat, expert parallelism and the Pallas kernels, each against a
# row of the main table: (name, variant, target, overrides beyond SIZED_FOR's). Rows in
# MEMORY_ONLY skip the scanned step's cost (aot_check --step_cost=false: two more compiles of
# a 46.7B model), so their step time and MFU bound are not reported.
CHANGES = (
    ("llama3_8b @ v5p, remat none", "llama3_8b", "tpu:v5p:4x4x4", {"model.remat": "none"}),
    ("llama3_8b @ v5p, remat full", "llama3_8b", "tpu:v5p:4x4x4", {"model.remat": "full"}),
    ("llama3_8b @ v5p, xla attention", "llama3_8b", "tpu:v5p:4x4x4",
     {"model.attention_impl": "xla"}),
    ("llama3_8b @ h100, cudnn attention", "llama3_8b", "gpu:h100:8",
     {"model.attention_impl": "cudnn"}),
    ("mixtral_8x7b @ v5p, ragged_dot gmm", "mixtral_8x7b", "tpu:v5p:4x4x4",
     {"model.moe.gmm_impl": "ragged_dot"}),
    ("mixtral_8x7b @ v5p, no expert parallelism", "mixtral_8x7b", "tpu:v5p:4x4x4",
     {"mesh.expert": 1, "mesh.fsdp": 64, "model.moe.gmm_impl": "ragged_dot"}),
    # one 8-GPU node cannot hold its state (the h100 row); two can
    ("mixtral_8x7b @ 2 x 8 H100", "mixtral_8x7b", "gpu:h100:16",
     {"mesh.fsdp": 2, "mesh.expert": 8, "train.global_batch_size": 16}),
)


MEMORY_ONLY = ("mixtral_8x7b @ v5p, ragged_dot gmm", "mixtral_8x7b @ v5p, no expert parallelism")


def rows(table: str = "all") -> list[dict]:
  out = []
  for variant in pod.VARIANTS if table != "changes" else ():
    for target in pod.SIZED_FOR_TARGETS:
      out.append({"name": f"{variant} @ {pod.short(target)}", "variant": variant,
                  "target": target, "overrides": pod.sized_for(variant, target)})
  for name, variant, target, extra in CHANGES if table != "main" else ():
    sized = pod.sized_for(variant, target) if target in pod.SIZED_FOR_TARGETS else {}
    out.append({"name": name, "variant": variant, "target": target,
                "overrides": {**sized, **extra}, "step_cost": name not in MEMORY_ONLY})
  return out


def command(row: dict, json_path: str) -> list[str]:
  return ([sys.executable, "-m", "experiments.aot_check",
           f"--config=configs/pod.py:{row['variant']}", f"--target={row['target']}"] +
          [f"--config.{k}={v}" for k, v in row["overrides"].items()] +
          ([] if row.get("step_cost", True) else ["--step_cost=false"]) +
          [f"--json={json_path}"])


def run_row(row: dict) -> dict:
  with tempfile.TemporaryDirectory() as scratch:
    path = os.path.join(scratch, "row.json")
    proc = subprocess.run(command(row, path), cwd=_ROOT, capture_output=True, text=True,
                          timeout=_TIMEOUT.value)
    if not os.path.exists(path):  # a crash, not a verdict: keep its last line
      tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
      return {**row, "status": "error", "error": tail[-500:]}
    with open(path) as f:
      return {**row, **json.load(f)}


def _gib(n: float) -> str:
  return f"{n / GIB:,.2f}"


def markdown(results: list[dict]) -> str:
  lines = ["| row | mesh (data / fsdp / expert) | batch x len | params | state / chip GiB | "
           "temp / chip GiB | needed / chip GiB, of HBM | optimal step | MFU bound | "
           "compile |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    if r["status"] != "fits":
      why = r.get("refused") or r.get("error", "")
      lines.append(f"| {r['name']} | {r['status']}: {why} | | | | | | | | "
                   f"{r.get('compile_seconds', '')} s |")
      continue
    m = r["mesh"]
    seconds = r.get("optimal_seconds")
    step = (f"{seconds * 1e3:,.1f} ms" if seconds and seconds > 0 else
            "n/a (GPU)" if r["target"].startswith("gpu") else
            "not asked" if not r.get("step_cost", True) else "not reported")
    mfu = f"{r['mfu_bound']:.1%}" if r.get("mfu_bound") else "—"
    lines.append(
        f"| {r['name']} | {m['data']} / {m['fsdp']} / {m['expert']} | "
        f"{r['batch_shape'][0]} x {r['batch_shape'][1] - 1} | {r['params'] / 1e9:.2f}B | "
        f"{_gib(r['state_bytes'])} | {_gib(r.get('temp_bytes', 0))} | "
        f"{_gib(r['needed_bytes'])}, {r['hbm_fraction']:.1%} | {step} | {mfu} | "
        f"{r['compile_seconds']:.0f} s |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  chosen = [r for r in rows(_TABLE.value)
            if not _ROWS.value or any(p in r["name"] for p in _ROWS.value)]
  if not chosen:
    raise SystemExit(f"--rows={','.join(_ROWS.value)} matches no row; --list shows them")
  if _LIST.value:
    for r in chosen:
      print(f"{r['name']}:\n  {shlex.join(command(r, 'OUT.json')[1:])}")
    return
  results = []
  if _OUT.value:  # taken before the first row: the results file it writes is not the tree's
    from effjax import provenance  # pylint: disable=g-import-not-at-top
    record = provenance.collect()
  for i, row in enumerate(chosen):
    print(f"[{i + 1}/{len(chosen)}] {row['name']} ...", flush=True)
    result = run_row(row)
    results.append(result)
    print(f"    {result['status']}"
          + (f": {_gib(result['needed_bytes'])} GiB needed per chip"
             if result["status"] == "fits" else f": {result.get('refused') or result['error']}")
          + f" ({result.get('compile_seconds', '?')} s)", flush=True)
    if _OUT.value:  # after every row: an interrupted matrix keeps what it compiled
      with open(_OUT.value, "w", encoding="utf-8") as f:
        json.dump({"rows": results, "complete": len(results) == len(chosen),
                   "provenance": record}, f, indent=1, default=str)
  print(markdown(results))


if __name__ == "__main__":
  define_flags()
  app.run(main)
