"""Lorentz-model (hyperboloid) layers of the fully hyperbolic network HyboNet (Chen et al.,
"Fully Hyperbolic Neural Networks", ACL 2022), built on effjax's linear factory.

Manifold: H = {x in R^{n+1} : <x, x>_L = -K, x_0 > 0}, curvature -1/K (K > 0), with the
Lorentzian inner product <x, y>_L = -x_0 y_0 + sum_i x_i y_i. x_0 is the time-like coordinate,
x_1.. the space-like part; the origin is o = (sqrt(K), 0, ..., 0). Shapes carry the ambient
dimension (time + space): a point of H^n is a vector of n + 1 numbers.

  lorentz_inner, sq_distance     <x, y>_L and d_L^2(x, y) = -2K - 2 <x, y>_L (HyboNet's
                                 squared Lorentzian distance, used for attention and logits)
  from_space                     (sqrt(|s|^2 + K), s): the point whose space-like part is s
  expmap0, logmap0               exp/log maps at the origin (tangent vectors given by their
                                 space-like part: the time component of a tangent at o is 0)
  centroid                       Lorentzian centroid sqrt(K) a / |<a, a>_L|^(1/2), a = sum w_j x_j
  manifold_error                 |<x, x>_L + K| / x_0^2: the relative membership error tests use

  LorentzLinear     HyboNet's linear layer: y = W x + b with W from make_linear (so dense, LoRA
                    and SST W work unchanged; GaLore and ReLoRA act on those params); the first
                    output of each head is the time pre-activation z, the rest the space part s.
                    time_scaling=True (HyboNet's layer): t = sqrt(K) (lambda sigmoid(z) + 1.1),
                    lambda = exp(learnable log-scale), s rescaled so that t^2 - |s|^2 = K.
                    time_scaling=False: t = sqrt(|s|^2 + K) (z unused): with W = identity and
                    b = 0 this is the identity map on H (the space part is kept, the time part
                    recomputed), as HyboNet's general form f_x(M) = [sqrt(|Wx|^2 + K); W x].
                    Optional HyboNet input activation and input dropout.
  LorentzLayerNorm  Euclidean layer norm on the space-like part, time recomputed.
  lorentz_residual  x (+) y = centroid of x and y with equal weights (HyboNet's residual).
  lorentz_dropout   dropout on the space-like part, time recomputed.
  lorentz_attention weights softmax((2K + 2 <q, k>_L) * scale) (= -d_L^2 up to a constant),
                    causal and segment masked; output the Lorentzian centroid of the values.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from effjax.config import LinearConfig
from effjax.layers.linear import make_linear

# HyboNet's time coordinate is sqrt(K) (lambda sigmoid(z) + TIME_OFFSET): strictly above the
# origin's sqrt(K), so the rescaled space part is never the square root of a negative number.
TIME_OFFSET = 1.1
_EPS = 1e-8  # floor under squared norms that are divided by


def lorentz_inner(x, y, keepdims: bool = False):
  """<x, y>_L over the last axis."""
  prod = x * y
  out = jnp.sum(prod[..., 1:], axis=-1, keepdims=True) - prod[..., :1]
  return out if keepdims else out[..., 0]


def sq_distance(x, y, k):
  """HyboNet's squared Lorentzian distance -2K - 2 <x, y>_L (>= 0 on H)."""
  return -2.0 * k - 2.0 * lorentz_inner(x, y)


def from_space(space, k):
  """The point of H whose space-like part is `space`."""
  time = jnp.sqrt(jnp.sum(jnp.square(space), axis=-1, keepdims=True) + k)
  return jnp.concatenate([time, space], axis=-1)


def origin(dim: int, k, dtype=jnp.float32):
  """o = (sqrt(K), 0, ..., 0) in ambient dimension `dim`."""
  return jnp.zeros((dim,), dtype).at[0].set(jnp.sqrt(jnp.asarray(k, dtype)))


def _safe_norm(v):
  """|v| over the last axis, with a finite gradient at v = 0."""
  sq = jnp.sum(jnp.square(v), axis=-1, keepdims=True)
  safe_sq = jnp.where(sq > _EPS, sq, 1.0)
  return jnp.where(sq > _EPS, jnp.sqrt(safe_sq), 0.0)


def expmap0(tangent_space, k):
  """exp_o(u) for the tangent u = (0, tangent_space) at the origin:
  (sqrt(K) cosh(|u| / sqrt(K)), sqrt(K) sinh(|u| / sqrt(K)) u / |u|)."""
  sqrt_k = jnp.sqrt(k)
  theta = _safe_norm(tangent_space) / sqrt_k
  # sinh(theta) / theta -> 1 near 0; the series keeps the gradient finite there
  safe = jnp.where(theta > 1e-3, theta, 1.0)
  sinhc = jnp.where(theta > 1e-3, jnp.sinh(safe) / safe, 1.0 + jnp.square(theta) / 6.0)
  return jnp.concatenate([sqrt_k * jnp.cosh(theta), sinhc * tangent_space], axis=-1)


def logmap0(x, k):
  """The space-like part of log_o(x) (its time part is 0): sqrt(K) asinh(|s| / sqrt(K)) s / |s|.

  asinh of the space norm rather than acosh(x_0 / sqrt(K)): equal on H, but acosh has an
  infinite derivative at the origin and loses all precision near it in float32."""
  sqrt_k = jnp.sqrt(k)
  space = x[..., 1:]
  rho = _safe_norm(space) / sqrt_k
  safe = jnp.where(rho > 1e-3, rho, 1.0)
  ratio = jnp.where(rho > 1e-3, jnp.arcsinh(safe) / safe, 1.0 - jnp.square(rho) / 6.0)
  return ratio * space


def centroid(weighted_sum, k):
  """Lorentzian centroid: the time-like vector `weighted_sum` (sum of w_j x_j, w_j >= 0, not
  all 0) scaled back onto H: sqrt(K) a / |<a, a>_L|^(1/2)."""
  norm_sq = jnp.abs(lorentz_inner(weighted_sum, weighted_sum, keepdims=True))
  return jnp.sqrt(k) * weighted_sum * jax.lax.rsqrt(jnp.maximum(norm_sq, _EPS))


def manifold_error(x, k):
  """|<x, x>_L + K| / max(x_0^2, K): float32 keeps about 1e-7 of x_0^2, not of K."""
  return jnp.abs(lorentz_inner(x, x) + k) / jnp.maximum(jnp.square(x[..., 0]), k)


def lorentz_residual(x, y, k):
  """x (+) y: the Lorentzian centroid of x and y (equal weights)."""
  return centroid(x + y, k)


def lorentz_dropout(x, k, rate: float, rng, deterministic: bool):
  """Dropout (inverted scaling) on the space-like part, the time part recomputed."""
  if deterministic or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x[..., 1:].shape)
  return from_space(jnp.where(keep, x[..., 1:] / (1.0 - rate), 0.0), k)


def _heads(x, heads: int):
  return x.reshape(x.shape[:-1] + (heads, x.shape[-1] // heads))


class LorentzLinear(nn.Module):
  """HyboNet's Lorentz linear layer (see the module docstring): [..., in] -> [..., features].

  With heads > 1 the output is `heads` points of H^{features / heads - 1}, concatenated (each
  head's first coordinate is its time). `k` is passed in (a fixed or learned curvature).
  `group`, `in_axis`, `out_axis` and `init_std` go to make_linear unchanged."""
  features: int
  linear: LinearConfig
  group: str
  in_axis: str
  out_axis: str
  init_std: float = 0.02
  heads: int = 1
  time_scaling: bool = True
  time_scale: float = 10.0  # HyboNet's lambda at init
  learn_time_scale: bool = True
  activation: Callable[[Any], Any] | None = None  # applied to the input (HyboNet's h(x))
  dropout: float = 0.0  # on the input of W (HyboNet), rng stream "noise"

  @nn.compact
  def __call__(self, x, k, *, deterministic: bool = True):
    if self.features % self.heads or self.features // self.heads < 2:
      raise ValueError(f"LorentzLinear: features={self.features} must split into heads="
                       f"{self.heads} points of at least 2 coordinates (time + space)")
    if self.activation is not None:
      x = self.activation(x)
    if self.dropout and not deterministic:
      x = nn.Dropout(self.dropout, rng_collection="noise")(x, deterministic=False)
    w = make_linear(self.linear, self.features, group=self.group, in_axis=self.in_axis,
                    out_axis=self.out_axis, name="w", init_std=self.init_std,
                    dtype=jnp.float32, param_dtype=jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                           (self.out_axis,)),
                      (self.features,), jnp.float32)
    y = _heads(w(x) + bias, self.heads)
    z, space = y[..., :1], y[..., 1:]
    if self.time_scaling:
      log_scale = self.param("log_time_scale",
                             lambda _: jnp.asarray(math.log(self.time_scale), jnp.float32))
      if not self.learn_time_scale:
        log_scale = jax.lax.stop_gradient(log_scale)
      time = jnp.sqrt(k) * (jnp.exp(log_scale) * nn.sigmoid(z) + TIME_OFFSET)
      sq = jnp.maximum(jnp.sum(jnp.square(space), axis=-1, keepdims=True), _EPS)
      space = space * jnp.sqrt((jnp.square(time) - k) / sq)
      out = jnp.concatenate([time, space], axis=-1)
    else:
      out = from_space(space, k)
    return out.reshape(out.shape[:-2] + (self.features,))


class LorentzLayerNorm(nn.Module):
  """Layer norm of the space-like part (learned scale and shift), time recomputed."""
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x, k):
    space = x[..., 1:]
    n = space.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (n,), jnp.float32)
    shift = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                       (n,), jnp.float32)
    mean = jnp.mean(space, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(space - mean), axis=-1, keepdims=True)
    space = (space - mean) * jax.lax.rsqrt(var + self.eps) * scale + shift
    return from_space(space, k)


def lorentz_attention(q_BLNH, k_BSKH, v_BSKH, mask_B11LS, curvature, scale):
  """Grouped-query Lorentz attention; every head vector is a point of H (ambient H).

  Scores (2K + 2 <q, k>_L) * scale = -d_L^2(q, k) * scale (softmax drops the 2K), masked;
  output per query and head: the Lorentzian centroid of the values under those weights."""
  b, l, n, h = q_BLNH.shape
  kv = k_BSKH.shape[2]
  q_BLKGH = q_BLNH.reshape(b, l, kv, n // kv, h)
  # <q, k>_L = q . (k with its time coordinate negated)
  k_flip = k_BSKH.at[..., 0].multiply(-1.0)
  inner_BKGLS = jnp.einsum("blkgh,bskh->bkgls", q_BLKGH, k_flip)
  logits_BKGLS = (2.0 * curvature + 2.0 * inner_BKGLS) * scale
  logits_BKGLS = jnp.where(mask_B11LS, logits_BKGLS, jnp.finfo(jnp.float32).min)
  probs_BKGLS = jax.nn.softmax(logits_BKGLS, axis=-1)
  sum_BLKGH = jnp.einsum("bkgls,bskh->blkgh", probs_BKGLS, v_BSKH)
  return centroid(sum_BLKGH, curvature).reshape(b, l, n, h)
