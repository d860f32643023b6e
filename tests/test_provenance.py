import dataclasses
import json
import os
import subprocess

import jax
import pytest

from effjax import provenance
from effjax.config import ExperimentConfig


def _git(repo, *args):
  subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                 env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                      "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})


@pytest.fixture
def repo(tmp_path):
  _git(tmp_path, "init", "-q")
  (tmp_path / "code.py").write_text("x = 1\n")
  (tmp_path / ".gitignore").write_text("runs/\n")
  _git(tmp_path, "add", "code.py", ".gitignore")
  _git(tmp_path, "commit", "-q", "-m", "first")
  return tmp_path


def test_collect_records_commit_versions_device_config_and_command():
  cfg = ExperimentConfig()
  record = provenance.collect(cfg, argv=["--seeds=0,1"])
  head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                        cwd=os.path.dirname(provenance.__file__)).stdout.strip()
  assert record["git"]["commit"] == head and isinstance(record["git"]["dirty"], bool)
  assert record["versions"]["jax"] == jax.__version__
  assert record["versions"]["flax"] and record["versions"]["optax"]
  assert record["device"]["count"] == len(jax.devices())
  assert record["device"]["kind"] == jax.devices()[0].device_kind
  assert record["config"] == dataclasses.asdict(cfg)
  assert record["command"].endswith("--seeds=0,1") and " -m " in record["command"]
  json.dumps(record)  # a results file can hold it


def test_dirty_detection_in_a_temporary_repo(repo):
  clean = provenance.git_state(str(repo))
  assert len(clean["commit"]) == 40 and clean["dirty"] is False
  (repo / "runs").mkdir()
  (repo / "runs" / "out.json").write_text("{}")  # ignored: still clean
  assert provenance.git_state(str(repo))["dirty"] is False
  (repo / "code.py").write_text("x = 2\n")
  state = provenance.git_state(str(repo))
  assert state["dirty"] is True and state["changed"] == ["code.py"]
  with pytest.raises(provenance.ProvenanceError, match=r"uncommitted changes \(code.py\).*--allow_dirty"):
    provenance.require_clean_tree(False, str(repo))
  assert provenance.require_clean_tree(True, str(repo))["dirty"] is True
  _git(repo, "checkout", "-q", "code.py")
  (repo / "new_module.py").write_text("")  # untracked code counts as a change
  assert provenance.git_state(str(repo))["changed"] == ["new_module.py"]


def test_outside_git_there_is_no_commit_and_a_headline_run_is_refused(tmp_path):
  assert provenance.git_state(str(tmp_path))["commit"] is None
  with pytest.raises(provenance.ProvenanceError, match=r"not a git checkout"):
    provenance.require_clean_tree(False, str(tmp_path))


def test_resumed_workdir_is_refused_unless_asked(tmp_path):
  provenance.require_fresh_workdir(str(tmp_path / "missing"), allow_resume=False)
  provenance.require_fresh_workdir(str(tmp_path), allow_resume=False)  # empty
  (tmp_path / "old_run").mkdir()
  with pytest.raises(provenance.ProvenanceError, match=r"is not empty.*--allow_resume"):
    provenance.require_fresh_workdir(str(tmp_path), allow_resume=False)
  provenance.require_fresh_workdir(str(tmp_path), allow_resume=True)


def test_write_json_embeds_provenance(tmp_path):
  provenance.write_json(str(tmp_path / "a.json"), [{"eval_loss": 1.0}], ExperimentConfig())
  provenance.write_json(str(tmp_path / "b.json"), {"runs": []})
  a = json.loads((tmp_path / "a.json").read_text())
  b = json.loads((tmp_path / "b.json").read_text())
  assert a["rows"] == [{"eval_loss": 1.0}] and a["provenance"]["config"]["data"]["seq_len"]
  assert b["runs"] == [] and "config" not in b["provenance"] and b["provenance"]["git"]


def test_reproduce_compares_recorded_numbers_within_the_tolerance():
  from experiments import reproduce
  keys = ["eval_loss", "mean"]
  recorded = {"runs": [{"eval_loss": 2.0, "wall_s": 10.0}, {"eval_loss": 3.0}],
              "chosen": {"sst": {"eval_loss": {"mean": 2.5, "range": 0.1}}},
              "provenance": {"eval_loss": 99.0}}
  close = json.loads(json.dumps(recorded))
  close["runs"][0].update(eval_loss=2.0 * (1 + 5e-4), wall_s=99.0)  # wall time not compared
  ok, lines = reproduce.compare(recorded, close, keys, rtol=1e-3)
  assert ok and len(lines) == 3  # two runs and one mean; provenance skipped
  far = json.loads(json.dumps(close))
  far["chosen"]["sst"]["eval_loss"]["mean"] = 2.6
  ok, lines = reproduce.compare(recorded, far, keys, rtol=1e-3)
  assert not ok and any(l.startswith("DIFFERS") and "mean" in l for l in lines)
  missing = {"runs": [{"eval_loss": 2.0}]}
  ok, lines = reproduce.compare(recorded, missing, keys, rtol=1e-3)
  assert not ok and any(l.startswith("MISSING") for l in lines)


def test_reproduce_moves_outputs_to_scratch_and_drops_resume():
  from experiments import reproduce
  args = reproduce.redirect("python3 -m experiments.repro_sst --workdir=runs/a --out runs/a.json "
                            "--seeds=0,1 --allow_resume --allow_dirty", "/scratch")
  assert args[1:] == ["-m", "experiments.repro_sst", "--workdir=/scratch/workdir",
                      "--out=/scratch/out.json", "--seeds=0,1", "--allow_dirty"]


def test_orderings_are_claimed_only_when_the_gap_exceeds_the_seed_range():
  from experiments import runs
  a, b = runs.stats([1.00, 1.02]), runs.stats([1.10, 1.11])
  assert runs.ordered(a, b) is True and runs.ordered(b, a) is False
  wide = runs.stats([1.00, 1.20])  # range 0.2 > gap to b's mean
  assert runs.ordered(wide, b) is None
  assert runs.ordered(runs.stats([1.0]), runs.stats([2.0])) is None  # one seed: no claim
  rows = [dict(variant=v, final_bpb=x) for v, x in
          [("dense", 2.00), ("dense", 2.02), ("moe", 1.90), ("moe", 1.91), ("evo", 1.95),
           ("evo", 2.10)]]
  table, verdicts = runs.versus_baseline(rows)
  assert verdicts == {"moe": "better (lower)", "evo": "not resolved by the seeds"}
  assert "| moe | 1.9050 [1.9000, 1.9100] | 2 | better (lower) |" in table
