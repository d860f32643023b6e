"""Training-time surgery on LM param trees: pure functions `params -> params`.

A Monarch layer's params are a dict with "w1" and "w2"; a dense projection's params are a
dict with "kernel". The functions below walk a param tree together with a *target* tree (the
params, or just their `jax.ShapeDtypeStruct`s, of the model to convert into), convert where
the two disagree on the kind of a projection, and copy everything else unchanged. Scanned
layers (a leading `layers` axis) are handled.

  monarch_params_to_dense   Monarch -> dense, exact (the function is unchanged).
  project_params_to_monarch dense -> nearest Monarch (per-block truncated SVD).
  transfer_opt_state        carries optimizer state across a change of param structure.
  densify_train_state       the reverse-sparsification switch for a whole TrainState.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from effjax.layers.monarch import monarch_to_dense, project_to_monarch


def _is_monarch(node) -> bool:
  return isinstance(node, Mapping) and "w1" in node and "w2" in node


def _is_dense(node) -> bool:
  return isinstance(node, Mapping) and "kernel" in node


def _convert(params, target, convert_node: Callable, path: str = ""):
  """Walks `params` and `target` together; `convert_node` returns None where nothing changes."""
  converted = convert_node(params, target, path)
  if converted is not None:
    return converted
  if isinstance(params, Mapping):
    if not isinstance(target, Mapping) or set(params) != set(target):
      keys = sorted(target) if isinstance(target, Mapping) else type(target).__name__
      raise ValueError(f"param tree mismatch at {path or '/'}: {sorted(params)} vs {keys}")
    return {k: _convert(params[k], target[k], convert_node, f"{path}/{k}") for k in params}
  if tuple(params.shape) != tuple(target.shape):
    raise ValueError(f"param {path}: shape {params.shape} does not match the target's "
                     f"{target.shape}")
  return params


def copy_params(params, target):
  """`params` checked against `target`'s structure and shapes (under jit: placed as asked)."""
  return _convert(params, target, lambda p, t, path: None)


def monarch_params_to_dense(params, target):
  """Every Monarch layer of `params` multiplied out into the dense kernel `target` expects.

  `target` is the (abstract) param tree of the same model with those projections dense; the
  kernel's [in, out] shape drops the Monarch padding.
  """
  def node(p, t, path):
    if not (_is_monarch(p) and _is_dense(t)):
      return None
    if "bias" in p and "bias" not in t:
      raise ValueError(f"{path}: the Monarch layer has a bias but the dense target does not")
    n_in, n_out = t["kernel"].shape[-2:]
    out = {"kernel": monarch_to_dense(p, n_in, n_out).astype(t["kernel"].dtype)}
    if "bias" in t:
      out["bias"] = p["bias"] if "bias" in p else jnp.zeros(t["bias"].shape, t["bias"].dtype)
    return out
  return _convert(params, target, node)


def project_params_to_monarch(params, target):
  """Every dense kernel of `params` whose place in `target` is Monarch, projected onto it.

  The block count is read off the target's w1 ([..., k, q, p]). Exact for weights that are
  already Monarch; otherwise the Frobenius-nearest Monarch matrix.
  """
  def node(p, t, path):
    if not (_is_dense(p) and _is_monarch(t)):
      return None
    nblocks = t["w1"].shape[-3]
    factors = project_to_monarch(p["kernel"], nblocks)
    out = {}
    for name in ("w1", "w2"):
      if factors[name].shape != tuple(t[name].shape):
        raise ValueError(f"{path}/{name}: projection of kernel {p['kernel'].shape} gives "
                         f"{factors[name].shape}, the target expects {t[name].shape}")
      out[name] = factors[name].astype(t[name].dtype)
    if "bias" in t:
      out["bias"] = p["bias"] if "bias" in p else jnp.zeros(t["bias"].shape, t["bias"].dtype)
    elif "bias" in p:
      raise ValueError(f"{path}: the dense layer has a bias but the Monarch target does not")
    return out
  return _convert(params, target, node)


def projection_error(dense_params, target) -> jax.Array:
  """Relative Frobenius error, over all kernels that `target` makes Monarch, of projecting
  `dense_params` onto `target` (0 when those kernels already are Monarch)."""
  sums = []

  def node(p, t, path):
    del path
    if not (_is_dense(p) and _is_monarch(t)):
      return None
    w = p["kernel"].astype(jnp.float32)
    back = monarch_to_dense(project_to_monarch(w, t["w1"].shape[-3]), *w.shape[-2:])
    sums.append((jnp.sum(jnp.square(back - w)), jnp.sum(jnp.square(w))))
    return p

  _convert(dense_params, target, node)
  if not sums:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(d for d, _ in sums) / sum(n for _, n in sums))


def _by_path(tree) -> dict[str, Any]:
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def transfer_opt_state(old_opt_state, fresh_opt_state):
  """`fresh_opt_state` with every leaf that also exists in `old_opt_state` (same path in the
  tree and same shape) taken from the old state.

  After a change of param structure this keeps step counts and the moments of unchanged
  params (embeddings, norms, projections that were already dense) and leaves the fresh
  (zero) moments of new params, e.g. a dense `kernel` that replaced Monarch `w1`/`w2`.
  """
  old = _by_path(old_opt_state)
  paths, treedef = jax.tree_util.tree_flatten_with_path(fresh_opt_state)
  leaves = []
  for path, leaf in paths:
    prev = old.get(jax.tree_util.keystr(path))
    same = prev is not None and prev.shape == leaf.shape and prev.dtype == leaf.dtype
    leaves.append(prev if same else leaf)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def densify_train_state(state, dense_target_params, tx):
  """The reverse-sparsification switch: Monarch params -> dense, optimizer state carried over.

  Params: each Monarch layer becomes its exact dense product, so the model computes the same
  function. Optimizer state (the documented choice): the step counts and the AdamW moments of
  every param that did not change are kept; the new dense kernels start with zero moments
  (the moments of w1/w2 have no faithful image in the dense weight's coordinates: the second
  moment is not linear in the gradient). With the step count kept, Adam's bias correction is
  ~1, so the first dense updates are smaller than usual (|update| <= ~0.45 lr in the first
  step at b1 = 0.9, b2 = 0.95) while the moments fill: a built-in warm-up, no jump.
  """
  params = monarch_params_to_dense(state.params, dense_target_params)
  opt_state = transfer_opt_state(state.opt_state, tx.init(params))
  return state.replace(params=params, opt_state=opt_state)
