"""Golden losses: every method variant's logged losses, pinned bit for bit.

Each variant of configs/lm.py, monarch.py, sst.py and moe.py trains 20 steps on the `test` base
with every train loss logged; the between-step transforms fire inside those steps (Monarch ->
dense at step 7, SST resample every step with a re-SVD every round, ReLoRA merge every step,
GaLore refresh every step, upcycling / Monarch projection from the `lm` run's checkpoint). A
change that alters any loss by one ulp fails here; a change meant to alter the numbers
re-records them (`python tests/test_golden_losses.py --record`) and says why in its commit.

The losses belong to one machine and one jax: on another CPU or jax version the test skips,
naming what differs (XLA's CPU code generation differs by instruction set and version).
Resume across each transform: the variants whose state or structure changes between steps,
stopped at step 10 and resumed, give the same losses. These runs take minutes, so they are drills (`make test-drills`).
"""
from __future__ import annotations

import json
import os
import platform
import sys

if __name__ == "__main__":  # the same 8 simulated devices as tests/conftest.py
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import jax
import jaxlib
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import lm, moe, monarch, sst  # noqa: E402
from effjax import config as config_lib  # noqa: E402
from effjax.train import loop  # noqa: E402
from effjax.train.metrics import read_metrics  # noqa: E402

GOLDEN_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden_losses.json")
STEPS = 20
RESUME_AT = 10
SOURCE = "lm:test"  # the dense run the init_from variants start from
VARIANTS = ((SOURCE,) + tuple(f"monarch:{v}" for v in monarch.VARIANTS)
            + tuple(f"sst:{v}" for v in sst.VARIANTS) + tuple(f"moe:{v}" for v in moe.VARIANTS))
NEEDS_SOURCE = ("monarch:finetune", "moe:upcycle", "moe:evomoe_diversify")
MODULES = {"lm": lm, "monarch": monarch, "sst": sst, "moe": moe}
# the variants whose state or structure changes between steps (the resume test runs these)
STATEFUL = ("monarch:reverse", "monarch:finetune", "sst:relora", "sst:galore", "sst:sst",
            "moe:sigmoid_bias", "moe:evomoe", "moe:upcycle", "moe:evomoe_diversify")


def machine() -> dict[str, str]:
  """What the losses depend on besides the code."""
  cpu = platform.processor() or platform.machine()
  isa = ""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      lines = f.read().splitlines()
    cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    # the model name can hide the vector extensions XLA generates code for ("AMD EPYC")
    flags = next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags"))
    isa = " ".join(sorted(f for f in flags if f.startswith(("avx", "fma", "amx"))))
  except (OSError, StopIteration):
    pass
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "cpu": cpu, "isa": isa,
          "devices": f"{jax.device_count()} x {jax.devices()[0].platform}"}


def config_for(variant: str, data_dir: str, source_workdir: str | None):
  module, name = variant.split(":")
  c = (MODULES[module].get_config("test") if module == "lm"
       else MODULES[module].get_config(f"{name},test"))
  c.data.data_dir = data_dir
  c.train.update(num_steps=STEPS, log_every=1, eval_every=RESUME_AT, checkpoint_every=RESUME_AT)
  if variant in NEEDS_SOURCE:
    c.train.init_from = source_workdir
  return config_lib.from_config_dict(c)


def train_losses(cfg, workdir: str, stop_at: int | None = None) -> dict[str, list[float]]:
  should_stop = None if stop_at is None else (lambda step: step == stop_at)
  loop.train_and_evaluate(cfg, workdir, should_stop=should_stop)
  if stop_at is not None:
    loop.train_and_evaluate(cfg, workdir)
  by_step = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  return {"train_loss": [by_step[s]["train_loss"] for s in range(1, STEPS + 1)],
          "eval_loss": [by_step[s]["eval_loss"] for s in (0, RESUME_AT, STEPS)]}


def run_all(base_dir: str, data_dir: str, stop_at: int | None = None, variants=VARIANTS):
  results = {}
  for variant in variants:
    workdir = os.path.join(base_dir, variant.replace(":", "_"))
    source = os.path.join(base_dir, SOURCE.replace(":", "_"))
    results[variant] = train_losses(config_for(variant, data_dir, source), workdir, stop_at)
  return results


@pytest.fixture(scope="module")
def golden():
  with open(GOLDEN_FILE, encoding="utf-8") as f:
    recorded = json.load(f)
  here = machine()
  differs = {k: (recorded["machine"].get(k), v) for k, v in here.items()
             if recorded["machine"].get(k) != v}
  if differs:
    pytest.skip(f"golden losses were recorded on another machine or jax: {differs}; "
                "re-record with `python tests/test_golden_losses.py --record`")
  return recorded["losses"]


def _assert_same(got, want, how: str):
  for variant in got:
    for key in ("train_loss", "eval_loss"):
      assert got[variant][key] == want[variant][key], (
          f"{variant} {how}: {key} differs from the golden losses\n"
          f"got  {got[variant][key]}\nwant {want[variant][key]}")


@pytest.mark.drill
def test_every_variant_reproduces_its_golden_losses(golden, tfds_dir, tmp_path):
  assert set(golden) == set(VARIANTS), "re-record: the variants changed"
  _assert_same(run_all(str(tmp_path), tfds_dir), golden, "uninterrupted")


@pytest.mark.drill
def test_stopping_and_resuming_across_every_transform_gives_the_golden_losses(
    golden, tfds_dir, tmp_path):
  losses = run_all(str(tmp_path), tfds_dir, stop_at=RESUME_AT,
                   variants=(SOURCE,) + STATEFUL)  # SOURCE: what the init_from runs start from
  _assert_same(losses, golden, f"stopped at step {RESUME_AT} and resumed")


def _record() -> None:
  import tempfile  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    losses = run_all(os.path.join(tmp, "runs"), os.path.join(tmp, "tfds"))
  with open(GOLDEN_FILE, "w", encoding="utf-8") as f:
    json.dump({"machine": machine(), "steps": STEPS, "losses": losses}, f, indent=1)
    f.write("\n")
  print(f"wrote {GOLDEN_FILE}: {len(losses)} variants")


if __name__ == "__main__":
  if sys.argv[1:] != ["--record"]:
    sys.exit("usage: python tests/test_golden_losses.py --record")
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  _record()
