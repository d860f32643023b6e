import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BLOCK_HEAVY = """
import sys
for name in ("tensorflow_datasets", "grain", "orbax", "orbax.checkpoint", "ml_collections",
             "tensorboardX", "tensorflow"):
  sys.modules[name] = None  # any import of these now raises ImportError
import effjax, pallas_kernels
import effjax.config, effjax.parallel, effjax.models.decoder_lm, effjax.train.step
import effjax.train.loop, effjax.data.pipeline
print("ok")
"""


def test_core_imports_need_only_jax_flax_optax_numpy():
  out = subprocess.run([sys.executable, "-c", _BLOCK_HEAVY], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "ok"
