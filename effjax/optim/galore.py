"""GaLore (Zhao et al., 2024) as in the paper: Adam on low-rank projected gradients.

For each projected weight G [m, n] (leading axes, e.g. scanned layers, are mapped over):
  side    the *smaller* dimension: left (P [m, r], R = P^T G [r, n]) if m <= n, else right
          (Q [n, r], R = G Q [m, r]);
  refresh every `update_every` steps (at steps 0, T, 2T, ...): P = the top-r left (Q: right)
          singular vectors of the current gradient;
  Adam    on R, with moments of R's shape that are *kept* across refreshes (not reset, not
          rotated: the paper's behaviour);
  update  scale * P N (left) or scale * N Q^T (right), N the bias-corrected Adam direction.
At full rank (r = min(m, n)) the projection is the identity instead of a rotation, so GaLore
with full rank and scale 1 is exactly Adam (Adam in a rotated basis would not be).
Leaves that are not projected (embeddings, norms, anything `is_projected` rejects) get plain
Adam. The result is a direction like optax.scale_by_adam's: chain it with weight decay and
the learning rate.

Where optax.contrib.galore (optax 0.2.8) differs: it projects on the left when m >= n, i.e.
the *larger* side (projector [max(m, n), r], Adam state r x min(m, n); the paper's choice has
projector [min(m, n), r] and Adam state r x max(m, n), so the two compress the gradient along
different dimensions), its default `scale` is 1.0 (paper: 0.25), its default projects every 2-D
param (embeddings included; the paper projects attention and MLP weights only), and at full
rank it still rotates. Moment handling across refreshes is the same (kept).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class GaLoreState(NamedTuple):
  count: jax.Array  # int32, updates so far
  mu: optax.Params  # first moments: projected shape for projected leaves
  nu: optax.Params
  proj: optax.Params  # P or Q for projected leaves; optax.MaskedNode() for the rest


def galore_shapes(shape, rank: int):
  """(left?, projector shape, projected-gradient shape) of a [..., m, n] weight."""
  *lead, m, n = shape
  r = min(rank, m, n)
  if m <= n:
    return True, (*lead, m, r), (*lead, r, n)
  return False, (*lead, n, r), (*lead, m, r)


def _top_vectors(g, rank: int, left: bool):
  """Top-r left (or right) singular vectors of g [m, n], or the identity at full rank."""
  m, n = g.shape
  side = m if left else n
  r = min(rank, m, n)
  if r == side:
    return jnp.eye(side, dtype=g.dtype)
  u, _, vt = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)
  vecs = u[:, :r] if left else vt[:r, :].T
  return vecs.astype(g.dtype)


def _over_leading(fn, ndim: int):
  for _ in range(ndim - 2):
    fn = jax.vmap(fn)
  return fn


def scale_by_galore(rank: int, update_every: int = 200, scale: float = 0.25, b1: float = 0.9,
                    b2: float = 0.999, eps: float = 1e-8,
                    is_projected: Callable[[tuple, jax.Array], bool] | None = None
                    ) -> optax.GradientTransformation:
  """The GaLore-Adam direction. `is_projected(path, leaf)` picks the projected weights
  (default: every leaf with ndim >= 2; leading axes beyond the last two are batch axes)."""
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"GaLore: rank must be a positive integer, got {rank!r}")
  if not isinstance(update_every, int) or update_every < 1:
    raise ValueError(f"GaLore: update_every must be a positive integer, got {update_every!r}")
  is_projected = is_projected or (lambda path, p: p.ndim >= 2)

  def flags(params):
    return jax.tree_util.tree_map_with_path(lambda path, p: bool(is_projected(path, p)), params)

  def init(params):
    # Flax's logically partitioned params (boxes) reach init when the train state is built:
    # the new arrays get boxes whose axis names fit their own shapes.
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
    proj_flags = jax.tree_util.tree_map_with_path(
        lambda path, p: bool(is_projected(path, nn.meta.unbox(p))), params, is_leaf=is_box)

    def boxed(box, value, names_fn):
      if isinstance(box, nn.Partitioned):
        return box.replace(value=value, names=names_fn(tuple(box.names)))
      return value

    def moments(p, f):
      value = nn.meta.unbox(p)
      if not f:
        return jax.tree.map(jnp.zeros_like, p)
      left, _, shape = galore_shapes(value.shape, rank)
      return boxed(p, jnp.zeros(shape, value.dtype),
                   lambda n: n[:-2] + ((None, n[-1]) if left else (n[-2], None)))

    def projector(p, f):
      value = nn.meta.unbox(p)
      if not f:
        return optax.MaskedNode()  # no array: orbax refuses zero-size arrays
      left, shape, _ = galore_shapes(value.shape, rank)
      return boxed(p, jnp.zeros(shape, value.dtype),
                   lambda n: n[:-2] + ((n[-2], None) if left else (n[-1], None)))

    mu = jax.tree.map(moments, params, proj_flags, is_leaf=is_box)
    return GaLoreState(count=jnp.zeros((), jnp.int32), mu=mu,
                       nu=jax.tree.map(jnp.zeros_like, mu),
                       proj=jax.tree.map(projector, params, proj_flags, is_leaf=is_box))

  def update(updates, state, params=None):
    del params
    count = state.count + 1
    refresh = (state.count % update_every) == 0
    c1 = 1 - b1 ** count.astype(jnp.float32)
    c2 = 1 - b2 ** count.astype(jnp.float32)

    def adam(r, mu, nu):
      mu = b1 * mu + (1 - b1) * r
      nu = b2 * nu + (1 - b2) * jnp.square(r)
      return mu, nu, (mu / c1) / (jnp.sqrt(nu / c2) + eps)

    def leaf(g, mu, nu, proj, f):
      if not f:
        mu, nu, n = adam(g, mu, nu)
        return n, mu, nu, proj
      left = galore_shapes(g.shape, rank)[0]
      top = _over_leading(lambda x: _top_vectors(x, rank, left), g.ndim)
      proj = jax.lax.cond(refresh, lambda: top(g), lambda: proj)
      low = (jnp.einsum("...mr,...mn->...rn", proj, g) if left
             else jnp.einsum("...mn,...nr->...mr", g, proj))
      mu, nu, n = adam(low, mu, nu)
      full = (jnp.einsum("...mr,...rn->...mn", proj, n) if left
              else jnp.einsum("...mr,...nr->...mn", n, proj))
      return scale * full, mu, nu, proj

    proj_flags = flags(updates)
    out = jax.tree.map(leaf, updates, state.mu, state.nu, state.proj, proj_flags)
    pick = lambda i: jax.tree.map(lambda _, o: o[i], updates, out)
    return pick(0), GaLoreState(count=count, mu=pick(1), nu=pick(2), proj=pick(3))

  return optax.GradientTransformation(init, update)
