"""One whole-split evaluation of the `test` LM on 8 simulated CPU devices, for the load drill
in tests/test_drills.py (a subprocess, so an abort in XLA cannot take pytest down with it).

  python tests/eval_under_load.py TFDS_DIR

Prints `evaluated N batches, T tokens in S s` and exits 0, or dies as the evaluation does.
"""
import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after the device count)

from configs import lm  # noqa: E402
from effjax import config as config_lib  # noqa: E402
from effjax.models.decoder_lm import DecoderLM  # noqa: E402
from effjax.optim import lowrank  # noqa: E402
from effjax.parallel import build_mesh  # noqa: E402
from effjax.train import evaluation  # noqa: E402
from effjax.train import step as step_lib  # noqa: E402


def main(tfds_dir: str) -> None:
  c = lm.get_config("test")
  c.data.data_dir = tfds_dir
  cfg = config_lib.from_config_dict(c)
  mesh = build_mesh(cfg.mesh)
  model = DecoderLM(cfg.model)
  tx, _ = lowrank.optimizer_for(cfg)
  state, _ = step_lib.create_train_state(model, tx, mesh, cfg.train.seed, cfg.data.seq_len)
  with step_lib.sharding_context(mesh):
    eval_step = jax.jit(step_lib.make_eval_step(model))
    evaluation.evaluate(eval_step, state.params, state.model_state, cfg, mesh, max_batches=2)
    start = time.perf_counter()  # compiled and the split's batches read: time the loop alone
    result = evaluation.evaluate(eval_step, state.params, state.model_state, cfg, mesh,
                                 max_batches=0)
  print(f"evaluated {int(result['eval_batches'])} batches, {int(result['eval_tokens'])} tokens "
        f"in {time.perf_counter() - start:.2f} s", flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
