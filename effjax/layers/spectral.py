"""Sparse Spectral Training (SST; Zhao et al., arXiv 2405.15481, ICML 2025): the layer and its
pure between-step functions.

A projection y = x @ W, W of shape [in, out], is held as W = U diag(sigma) V^T with
k = min(in, out), U [in, k], sigma [k], V [out, k], initialised by the exact SVD of the usual
dense init (normal(init_std)), so the function at init is that of the dense layer.

Memory layout (static shapes, the step compiles once):
  params (trained, the only leaves the optimizer sees)
    sigma   [k]     every singular value, every step (clamped >= 0 after each update)
    u_cols  [in, r] the r active columns of U
    v_cols  [out, r] the r active columns of V
  model state, collection "sst" (never seen by the optimizer; checkpointed with the state)
    u [in, k], v [out, k]  the full bases; their active columns are stale while active
    idx [r] int32          which columns are active
    seen [k] float32       1 at every position ever active (a statistic, not used in training)

Forward: U and V with the active columns taken from the params, then ((x U) * sigma) V^T
(2 k (in + out) FLOPs per token instead of 2 in out). Backward (a custom VJP): the usual
gradients for x and sigma; the "enhanced gradient" for the active columns, i.e. the autodiff
gradient without its sigma_i factor: d u_i = x^T (g v_i), d v_i = g^T (x u_i).

Between steps (pure functions on one layer's params and state, leading scan axes mapped over):
  sst_resample  write the active columns back into U, V; optionally re-SVD (U diag(sigma) V^T
                unchanged, orthogonality restored); draw a new active set (r indices without
                replacement) with one of SAMPLINGS; read the new active columns out.
The optimizer side (clamp, renormalisation, LR re-warm-up) is in effjax/optim/lowrank.py; the
whole-state resample (every SST layer, moment reset) in effjax/train/methods/sst.py.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from effjax.layers.frozen_base import FrozenBaseLinear, checked_shape, dense_init

SST_COLLECTION = "sst"
SPECTRAL = "spectral"  # logical name of the k axis of the bases and active columns (over fsdp)
SAMPLINGS = ("mixed", "sigma", "uniform", "top")
PARAM_NAMES = ("sigma", "u_cols", "v_cols")


def check_sampling(sampling: str, where: str = "SST") -> None:
  if sampling not in SAMPLINGS:
    raise ValueError(f"{where}: unknown sampling {sampling!r}; choose one of {list(SAMPLINGS)}")


def sst_param_count(n_in: int, n_out: int, rank: int) -> int:
  """Trainable parameters of one SST layer: r (in + out) + min(in, out)."""
  return rank * (n_in + n_out) + min(n_in, n_out)


def svd_factors(w_IO):
  """(U [in, k], sigma [k], V [out, k]) with W = U diag(sigma) V^T, in float32 at least."""
  w = w_IO.astype(jnp.promote_types(w_IO.dtype, jnp.float32))
  u, s, vt = jnp.linalg.svd(w, full_matrices=False)
  return u, s, jnp.swapaxes(vt, -1, -2)


def sampling_probabilities(sigma, sampling: str):
  """p over the k indices (the `top` rule is deterministic: p = sigma / sum, used for top-r)."""
  check_sampling(sampling)
  k = sigma.shape[-1]
  s = jnp.maximum(sigma.astype(jnp.float32), 0.0)
  total = jnp.sum(s, axis=-1, keepdims=True)
  # all-zero sigma: fall back to uniform rather than dividing by zero
  by_sigma = jnp.where(total > 0, s / jnp.where(total > 0, total, 1.0), 1.0 / k)
  if sampling == "uniform":
    return jnp.full_like(s, 1.0 / k)
  if sampling == "mixed":  # ICML version: half uniform, half sigma-weighted
    return 0.5 * (1.0 / k + by_sigma)
  return by_sigma  # sigma (v1), and the weights `top` ranks by


def sample_active(key, sigma, rank: int, sampling: str):
  """r distinct indices of sigma [k], int32: drawn without replacement with probabilities
  `sampling_probabilities` (Gumbel top-k = sequential draws without replacement), or the r
  largest singular values for `top`."""
  p = sampling_probabilities(sigma, sampling)
  if sampling == "top":
    scores = p
  else:
    scores = jnp.log(p) + jax.random.gumbel(key, p.shape, jnp.float32)
  return jax.lax.top_k(scores, rank)[1].astype(jnp.int32)


def merged_bases(u_cols, v_cols, u, v, idx):
  """The full U, V with the active columns taken from the params."""
  return u.at[:, idx].set(u_cols.astype(u.dtype)), v.at[:, idx].set(v_cols.astype(v.dtype))


@jax.custom_vjp
def sst_matmul(x, u_cols, v_cols, sigma, u, v, idx):
  """((x U) * sigma) V^T with the active columns from u_cols / v_cols; enhanced gradient."""
  u_full, v_full = merged_bases(u_cols, v_cols, u, v, idx)
  return jnp.einsum("...k,ok->...o", jnp.einsum("...i,ik->...k", x, u_full) * sigma, v_full)


def _sst_fwd(x, u_cols, v_cols, sigma, u, v, idx):
  u_full, v_full = merged_bases(u_cols, v_cols, u, v, idx)
  z = jnp.einsum("...i,ik->...k", x, u_full)
  y = jnp.einsum("...k,ok->...o", z * sigma, v_full)
  return y, (x, z, u_full, v_full, sigma, idx)


def _sst_bwd(res, g):
  x, z, u_full, v_full, sigma, idx = res
  gv = jnp.einsum("...o,ok->...k", g, v_full)  # G v_i for every i
  lead = tuple(range(g.ndim - 1))
  d_sigma = jnp.sum(z * gv, axis=lead).astype(sigma.dtype)
  d_x = jnp.einsum("...k,ik->...i", gv * sigma.astype(gv.dtype), u_full).astype(x.dtype)
  x2 = x.reshape(-1, x.shape[-1])
  d_u_cols = x2.T @ gv.reshape(-1, gv.shape[-1])[:, idx]  # x^T G v_i: no sigma_i factor
  d_v_cols = g.reshape(-1, g.shape[-1]).T @ z.reshape(-1, z.shape[-1])[:, idx]  # G^T x u_i
  return d_x, d_u_cols, d_v_cols, d_sigma, None, None, None


sst_matmul.defvjp(_sst_fwd, _sst_bwd)


class SSTLinear(FrozenBaseLinear):
  """y = x U diag(sigma) V^T; see the module docstring. `sampling` draws the first active set."""
  sampling: str = "mixed"

  @nn.compact
  def __call__(self, x):
    n_in, n_out, where = checked_shape(self, x, "SSTLinear")
    check_sampling(self.sampling, where)
    k = min(n_in, n_out)
    init = {}
    if self.is_initializing():  # the SVD of the dense init: computed at init only
      w0 = dense_init(self, n_in, n_out, jnp.float32)
      init["u"], init["sigma"], init["v"] = svd_factors(w0)
      init["idx"] = sample_active(self.make_rng("params"), init["sigma"], self.rank,
                                  self.sampling)

    pd = self.param_dtype

    def const(name, names, shape, dtype=pd):
      # flax also calls a param's init (abstractly) in apply to check the stored shape
      def make(*_):
        return init[name].astype(dtype) if name in init else jnp.zeros(shape, dtype)
      return nn.with_logical_partitioning(make, names)

    r = self.rank
    u = self.variable(SST_COLLECTION, "u", const("u", (self.in_axis, SPECTRAL), (n_in, k))).value
    v = self.variable(SST_COLLECTION, "v", const("v", (self.out_axis, SPECTRAL), (n_out, k))).value
    idx = self.variable(SST_COLLECTION, "idx", const("idx", (None,), (r,), jnp.int32)).value
    if self.is_initializing():
      init["seen"] = jnp.zeros((k,), jnp.float32).at[init["idx"]].set(1.0)
    # 1 where index i (of the k singular values, by position) has ever been active: reported
    # as the fraction of singular vectors SST trained (sst_seen_fraction)
    self.variable(SST_COLLECTION, "seen", const("seen", (None,), (k,), jnp.float32))
    if self.is_initializing():
      init["u_cols"], init["v_cols"] = init["u"][:, init["idx"]], init["v"][:, init["idx"]]
    sigma = self.param("sigma", const("sigma", (None,), (k,)))
    u_cols = self.param("u_cols", const("u_cols", (self.in_axis, SPECTRAL), (n_in, r)))
    v_cols = self.param("v_cols", const("v_cols", (self.out_axis, SPECTRAL), (n_out, r)))
    assert sigma.shape == (k,) and u_cols.shape == (n_in, self.rank), (sigma.shape, u_cols.shape)
    dt = self.dtype
    return sst_matmul(x.astype(dt), u_cols.astype(dt), v_cols.astype(dt), sigma.astype(dt),
                      u.astype(dt), v.astype(dt), idx)


def sst_dense_weight(params, state):
  """W [in, out] = U diag(sigma) V^T of one (unscanned) SST layer."""
  u, v = merged_bases(params["u_cols"], params["v_cols"], state["u"], state["v"], state["idx"])
  return jnp.einsum("ik,k,ok->io", u, params["sigma"], v, precision=jax.lax.Precision.HIGHEST)


def resvd(u, sigma, v):
  """(U', sigma', V') = SVD(U diag(sigma) V^T): the same matrix, orthonormal bases again.

  Done through QR of the two bases (k x k SVD in the middle), so it never forms W."""
  qu, ru = jnp.linalg.qr(u.astype(jnp.float32))
  qv, rv = jnp.linalg.qr(v.astype(jnp.float32))
  core = jnp.einsum("ak,k,bk->ab", ru, sigma.astype(jnp.float32), rv,
                    precision=jax.lax.Precision.HIGHEST)
  a, s, bt = jnp.linalg.svd(core)
  return ((qu @ a).astype(u.dtype), s.astype(sigma.dtype),
          (qv @ bt.T).astype(v.dtype))


def _resample_one(params, state, key, *, rank: int, sampling: str, do_resvd: bool):
  u, v = merged_bases(params["u_cols"], params["v_cols"], state["u"], state["v"], state["idx"])
  sigma = params["sigma"]
  if do_resvd:
    u, sigma, v = resvd(u, sigma, v)
  idx = sample_active(key, sigma, rank, sampling)
  new_params = dict(params, sigma=sigma, u_cols=u[:, idx], v_cols=v[:, idx])
  new_state = dict(state, u=u, v=v, idx=idx)
  if "seen" in state:
    new_state["seen"] = state["seen"].at[idx].set(1.0)
  return new_params, new_state


def seen_fraction(sst_state) -> float:
  """Fraction of singular-vector positions ever active, over every SST layer in `sst_state`
  (the model_state collection); nan without SST layers."""
  seen = [x for path, x in jax.tree_util.tree_leaves_with_path(sst_state)
          if getattr(path[-1], "key", None) == "seen"]
  total = sum(x.size for x in seen)
  return float(sum(jnp.sum(x) for x in seen) / total) if total else float("nan")


def sst_resample(params, state, key, *, sampling: str, do_resvd: bool):
  """One SST layer after an iteration: write back, optionally re-SVD, draw and read out a new
  active set. `params` {"sigma", "u_cols", "v_cols"}, `state` {"u", "v", "idx"[, "seen"]};
  `seen` marks the newly active positions too. Extra leading
  axes (scanned layers) are mapped over, each slice with its own key."""
  check_sampling(sampling)
  rank = params["u_cols"].shape[-1]
  lead = params["sigma"].shape[:-1]
  fn = lambda p, s, k: _resample_one(p, s, k, rank=rank, sampling=sampling, do_resvd=do_resvd)
  n = math.prod(lead)
  if not lead:
    return fn(params, state, key)
  for _ in lead:
    fn = jax.vmap(fn)
  keys = jax.random.split(key, n).reshape(*lead, *key.shape) if n else key
  return fn(params, state, keys)
