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


# effjax's layers, lowest first: a module may import from its own layer and the ones below it
# (the byte tokenizer, which imports nothing, sits with the config that needs its vocab size).
LAYERS = (("effjax.errors", "effjax.filelock", "effjax.trees", "effjax.config",
           "effjax.provenance", "effjax.data.tokenizer"),
          ("effjax.parallel", "effjax.data"), ("effjax.layers",), ("effjax.moe",),
          ("effjax.models",), ("effjax.optim",), ("effjax.train",))


def _layer(module: str) -> int:
  for i, packages in enumerate(LAYERS):
    if any(module == p or module.startswith(p + ".") for p in packages):
      return i
  raise AssertionError(f"{module} is in no layer of LAYERS")


def _effjax_imports(path: str) -> set[str]:
  import ast  # pylint: disable=g-import-not-at-top
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  found = set()
  for node in ast.walk(tree):  # function-level imports count too
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:  # `from effjax.data import tokenizer` imports the submodule
        sub = os.path.join(REPO, *f"{node.module}.{alias.name}".split("."))
        is_module = os.path.isfile(sub + ".py") or os.path.isdir(sub)
        found.add(f"{node.module}.{alias.name}" if is_module else node.module)
  return {m for m in found if m.startswith("effjax.")}


def test_no_module_imports_from_a_layer_above_it():
  violations = []
  root = os.path.join(REPO, "effjax")
  for directory, _, files in os.walk(root):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(directory, name)
      module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")
      if module == "effjax":
        continue
      own = _layer(module)
      for imported in _effjax_imports(path):
        try:
          theirs = _layer(imported)
        except AssertionError:
          continue  # a name imported from a package, e.g. effjax.config.ExperimentConfig
        if theirs > own:
          violations.append(f"{module} imports {imported}")
  assert not violations, violations
