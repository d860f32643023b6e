"""Checks that a recorded results file reproduces: same commit, same command, same numbers.

  python -m experiments.reproduce --results=runs/repro_sst.json            # check the commit
  python -m experiments.reproduce --results=runs/repro_sst.json --rerun    # and re-run it

The results file must carry the "provenance" record every experiment script writes
(effjax/provenance.py). Without --rerun this reports whether the current checkout is the
recorded commit and clean. With --rerun it clones this repository at the recorded commit into
a temporary directory, runs the recorded command there (its --workdir, --out and --plot
pointed at fresh temporary paths, --allow_resume dropped) and compares every number whose key
is in --keys between the two files, relative tolerance --rtol. Exit status 0 when everything
compared reproduces, 1 otherwise.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

from effjax import provenance

_RESULTS = flags.DEFINE_string("results", None, "A results JSON with provenance.", required=True)
_RERUN = flags.DEFINE_bool("rerun", False, "Re-run the recorded command at its commit.")
_RTOL = flags.DEFINE_float("rtol", 1e-3, "Relative tolerance of a reproduced number (runs on "
                           "the same kind of machine are usually exact; XLA on another CPU "
                           "can differ in the last bits, which training amplifies).")
_KEYS = flags.DEFINE_list("keys", ["eval_loss", "eval_ppl", "eval_perplexity", "eval_bpb",
                                   "final_bpb", "select_loss", "mean"],
                          "Numeric keys compared wherever they occur in the results.")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the temporary clone and workdir.")

_REDIRECTED = ("--workdir", "--out", "--plot")


def numbers(tree, keys, prefix: str = "") -> dict[str, float]:
  """{path: value} of every number stored under one of `keys`, provenance excluded."""
  found = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      if k == "provenance":
        continue
      path = f"{prefix}/{k}"
      if k in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
        found[path] = float(v)
      else:
        found.update(numbers(v, keys, path))
  elif isinstance(tree, list):
    for i, v in enumerate(tree):
      found.update(numbers(v, keys, f"{prefix}[{i}]"))
  return found


def compare(recorded: dict, rerun: dict, keys, rtol: float) -> tuple[bool, list[str]]:
  """(all reproduce, report lines). A number missing from the re-run does not reproduce."""
  want, got = numbers(recorded, keys), numbers(rerun, keys)
  if not want:
    return False, [f"no number under {list(keys)} in the recorded results"]
  lines, ok = [], True
  for path, value in sorted(want.items()):
    other = got.get(path)
    if other is None:
      ok = False
      lines.append(f"MISSING  {path}: recorded {value:.6g}, not in the re-run")
      continue
    same = (math.isnan(value) and math.isnan(other)) or math.isclose(
        value, other, rel_tol=rtol, abs_tol=0.0)
    ok &= same
    rel = abs(other - value) / abs(value) if value else abs(other)
    lines.append(f"{'ok      ' if same else 'DIFFERS '} {path}: recorded {value:.6g}, "
                 f"re-run {other:.6g} (rel. diff {rel:.2e})")
  return ok, lines


def redirect(command: str, scratch: str) -> list[str]:
  """The recorded command with its output paths moved under `scratch`, resume refused."""
  args = shlex.split(command)
  out, skip = [], False
  for i, a in enumerate(args):
    if skip:
      skip = False
      continue
    name = a.split("=", 1)[0]
    if name == "--allow_resume":
      continue
    if name in _REDIRECTED:
      if "=" not in a and i + 1 < len(args):
        skip = True  # "--out PATH"
      suffix = ".json" if name == "--out" else ".png" if name == "--plot" else ""
      out.append(f"{name}={os.path.join(scratch, name[2:] + suffix)}")
      continue
    out.append(a)
  if out and os.path.basename(out[0]).startswith("python"):
    out[0] = sys.executable
  return out


def main(argv):
  del argv
  with open(_RESULTS.value, encoding="utf-8") as f:
    recorded = json.load(f)
  record = recorded.get("provenance") if isinstance(recorded, dict) else None
  if not record or not record.get("git", {}).get("commit") or not record.get("command"):
    raise SystemExit(f"{_RESULTS.value} has no provenance record with a commit and a command "
                     "(written before effjax.provenance existed?): it cannot be reproduced")
  commit, command = record["git"]["commit"], record["command"]
  print(f"recorded: commit {commit[:12]} (dirty: {record['git']['dirty']}), "
        f"{record['date_utc']}, {record['device']['kind']} x {record['device']['count']}")
  print(f"command:  {command}")
  if record["git"]["dirty"]:
    print("warning: the recorded run came from a tree with uncommitted changes "
          f"({', '.join(record['git'].get('changed', [])[:5])}); it may not reproduce")
  here = provenance.git_state()
  print(f"here:     commit {str(here['commit'])[:12]} (dirty: {here['dirty']})")
  if not _RERUN.value:
    same = here["commit"] == commit and not here["dirty"]
    print("the current checkout IS the recorded commit" if same else
          "the current checkout is NOT the recorded commit (or has changes); --rerun runs "
          "the command at the recorded commit")
    sys.exit(0 if same else 1)
  scratch = tempfile.mkdtemp(prefix="effjax-reproduce-")
  clone = os.path.join(scratch, "repo")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(provenance.__file__)))
  subprocess.run(["git", "clone", "-q", repo, clone], check=True)
  subprocess.run(["git", "checkout", "-q", commit], cwd=clone, check=True)
  args = redirect(command, scratch)
  print("re-running: " + shlex.join(args), flush=True)
  env = {**os.environ, "PYTHONPATH": clone}
  subprocess.run(args, cwd=clone, env=env, check=True)
  with open(os.path.join(scratch, "out.json"), encoding="utf-8") as f:
    rerun = json.load(f)
  ok, lines = compare(recorded, rerun, _KEYS.value, _RTOL.value)
  print("\n".join(lines))
  print(f"{'REPRODUCES' if ok else 'DOES NOT REPRODUCE'} within rtol {_RTOL.value:g} "
        f"({len(lines)} numbers compared)")
  if not _KEEP.value:
    subprocess.run(["rm", "-rf", scratch], check=False)
  else:
    print(f"kept {scratch}")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  app.run(main)
