"""Where a result came from: commit, dirty flag, library versions, device, command, date.

Every results file an experiment script writes embeds `collect(config)`, so a number can be
traced to the code and command that produced it, and re-run (experiments/reproduce.py).
Headline runs call `require_clean_tree` and `require_fresh_workdir` first. Imports: stdlib and
jax only.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from typing import Any

import jax

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "libtpu",
             "jax-cuda12-plugin")  # the last two: compile-only targets (None where absent)
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ProvenanceError(RuntimeError):
  """A run that would not be reproducible was refused."""


def _git(args: list[str], repo: str, strip: bool = True) -> str | None:
  try:
    out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return None
  if out.returncode:
    return None
  return out.stdout.strip() if strip else out.stdout


def git_state(repo: str = _REPO) -> dict[str, Any]:
  """{commit, dirty, changed}: HEAD and the files that differ from it (tracked changes and
  untracked files git does not ignore). commit is None outside a git checkout."""
  commit = _git(["rev-parse", "HEAD"], repo)
  if commit is None:
    return {"commit": None, "dirty": None, "changed": []}
  # porcelain lines are "XY path": the leading status column may be a space
  status = _git(["status", "--porcelain", "--untracked-files=all"], repo, strip=False) or ""
  changed = sorted(line[3:] for line in status.splitlines() if line.strip())
  return {"commit": commit, "dirty": bool(changed), "changed": changed}


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def collect(config: Any = None, *, argv: list[str] | None = None,
            repo: str = _REPO) -> dict[str, Any]:
  """The provenance record; `config` (a dataclass, or a mapping) is embedded in full."""
  devices = jax.devices()
  if dataclasses.is_dataclass(config):
    config = dataclasses.asdict(config)
  record = {
      "git": git_state(repo),
      "versions": {p: _version(p) for p in _PACKAGES},
      "python": platform.python_version(),
      "platform": platform.platform(),
      "device": {"kind": devices[0].device_kind, "platform": devices[0].platform,
                 "count": len(devices), "process_count": jax.process_count()},
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": shlex.join([os.path.basename(sys.executable), "-m",
                             _module_of(sys.argv[0]), *(argv if argv is not None
                                                        else sys.argv[1:])]),
  }
  if config is not None:
    record["config"] = config
  return record


def _module_of(script: str) -> str:
  """`experiments/repro_sst.py` -> `experiments.repro_sst` (scripts run with python -m)."""
  path = os.path.abspath(script)
  if path.startswith(_REPO + os.sep) and path.endswith(".py"):
    return os.path.relpath(path, _REPO)[:-3].replace(os.sep, ".")
  return script


def require_clean_tree(allow_dirty: bool, repo: str = _REPO) -> dict[str, Any]:
  """git_state, or ProvenanceError when the tree has changes and `allow_dirty` is False."""
  state = git_state(repo)
  if state["commit"] is None and not allow_dirty:
    raise ProvenanceError(f"{repo} is not a git checkout: a headline run needs a commit to "
                          "cite; pass --allow_dirty to run anyway (results marked)")
  if state["dirty"] and not allow_dirty:
    shown = ", ".join(state["changed"][:5]) + (" ..." if len(state["changed"]) > 5 else "")
    raise ProvenanceError(f"the tree at {state['commit'][:12]} has uncommitted changes "
                          f"({shown}): commit them, or pass --allow_dirty (results marked)")
  return state


def require_fresh_workdir(workdir: str, allow_resume: bool) -> None:
  """ProvenanceError when `workdir` already holds files and `allow_resume` is False: a
  resumed run may mix results of older code."""
  if allow_resume or not os.path.isdir(workdir) or not os.listdir(workdir):
    return
  raise ProvenanceError(f"workdir {workdir} is not empty: a headline run starts fresh; use a "
                        "new --workdir, or pass --allow_resume to reuse finished runs")


def write_json(path: str, results: Any, config: Any = None) -> None:
  """Writes `results` to `path` with the provenance record under "provenance" (a list of
  results becomes {"rows": results, "provenance": ...})."""
  import json  # pylint: disable=g-import-not-at-top
  record = collect(config)
  body = dict(results) if isinstance(results, dict) else {"rows": results}
  body["provenance"] = record
  with open(path, "w", encoding="utf-8") as f:
    json.dump(body, f, indent=1, default=str)
