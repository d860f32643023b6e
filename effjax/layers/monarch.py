"""Monarch structured linear layers (Dao et al., ICML 2022), in JAX.

A Monarch matrix with k = `nblocks` blocks maps `[..., n_in] -> [..., n_out]` through two
block-diagonal factors and two fixed permutations:

  1. zero-pad x to k * p (p = ceil(n_in / k)) and view it as k blocks of p;
  2. w1 [k, q, p]: h[j, a] = sum_b w1[j, a, b] x[j, b]               (block-diagonal "R");
  3. stride permutation: flatten h to k * q, view as [r, k], swap to [k, r] (r = q);
  4. w2 [k, s, r]: y[l, c] = sum_a w2[l, c, a] h[l, a]               (block-diagonal "L");
  5. output permutation: swap y to [s, k], flatten, keep the first n_out (s = ceil(n_out / k)).

The factor facing the larger side does the expansion (as in the authors' code): if
k * p < k * s, w1 is [k, p, p] and w2 is [k, s, p]; otherwise w1 is [k, s, p] and w2 is
[k, s, s]. Parameters (and multiply-accumulates per token): k * q * (p + s), about
min(n_in, n_out) * (n_in + n_out) / k.

In the dense equivalent W (shape [n_in, n_out], y = x @ W, padded to [k p, k s]) the block of
input block j and output block l (output columns c * k + l) is a sum of outer products
w1[j, a, :] (x) w2[l, :, a'] over the channels a' = (j q + a - l) / k that route j to l: a
product of rank at most about q / k. Different blocks use disjoint rows of w1 and columns of
w2, so the nearest Monarch matrix in Frobenius norm is a per-block truncated SVD (paper,
Theorem 1), which `project_to_monarch` computes.

Initialisation (the authors' code): every factor i.i.d. uniform(-1/sqrt(f), 1/sqrt(f)) with f
its block input size (the last axis); the bias, if any, starts at zero.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

BLOCKS = "blocks"  # logical name of the block axis of both factors (sharded over `tensor`)
BLOCK_ROWS = "block_rows"  # their second axis (sharded over `fsdp`)


def monarch_shapes(in_features: int, out_features: int, nblocks: int, *,
                   where: str = "monarch") -> tuple[tuple[int, int, int], tuple[int, int, int]]:
  """((k, q, p), (k, s, r)): the shapes of w1 and w2; raises ValueError on bad sizes."""
  for name, value in (("nblocks", nblocks), ("in_features", in_features),
                      ("out_features", out_features)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
  if nblocks > min(in_features, out_features):
    raise ValueError(f"{where}: nblocks={nblocks} is larger than the layer's width "
                     f"(in_features={in_features}, out_features={out_features}); a Monarch "
                     "layer needs at least one input and one output per block")
  k = nblocks
  p, s = -(-in_features // k), -(-out_features // k)
  if k * p < k * s:
    return (k, p, p), (k, s, p)
  return (k, s, p), (k, s, s)


def monarch_param_count(in_features: int, out_features: int, nblocks: int,
                        use_bias: bool = False) -> int:
  """Parameters of a MonarchLinear; also its multiply-accumulates per token."""
  w1, w2 = monarch_shapes(in_features, out_features, nblocks)
  return math.prod(w1) + math.prod(w2) + (out_features if use_bias else 0)


def monarch_multiply_reference(x, w1_KQP, w2_KSR):
  """x [..., k * p] (already padded) -> [..., s * k]; the layer's two batched matmuls.

  The first formulation, written as the steps above read; kept as the reference that
  `monarch_multiply` is tested against. Differentiated by JAX, its forward + backward holds
  8 full-activation copies (10 with padding) where `monarch_multiply` holds 6.
  """
  k, q, p = w1_KQP.shape
  l, s, r = w2_KSR.shape
  lead = x.shape[:-1]
  x_BKP = x.reshape(*lead, k, p)
  h_BKQ = jnp.einsum("...kp,kqp->...kq", x_BKP, w1_KQP)
  # stride permutation: flat index j * q + a is read as (a', l) with a' * k + l
  h_BLR = jnp.swapaxes(h_BKQ.reshape(*lead, r, l), -1, -2)
  y_BLS = jnp.einsum("...lr,lsr->...ls", h_BLR, w2_KSR)
  return jnp.swapaxes(y_BLS, -1, -2).reshape(*lead, s * l)


# The copy-free formulation. A batched matmul on XLA wants its batch (block) axis outermost,
# so every activation between the two factors lives block-major, [k, tokens, width], and the
# matmuls and both weight gradients read and write it in place through their dimension
# numbers (the weight gradients contract over tokens, the middle axis). What is left is one
# pass per change between token-major and block-major order: x into blocks, the stride
# permutation, y out of blocks, and the same three in reverse for dy, dh and dx: 6 in all,
# each one fused pass (padding and the final slice ride along). The backward is written by
# hand (custom_vjp) so that padding and slicing are transposed into those same passes
# instead of standalone pads. (Exception: padded bfloat16 on a CPU, whose matmuls run in
# float32, holds 8: XLA builds the padded block-major x and dy once per dtype.)

def _contiguous_blocks(x_TN, k: int, p: int):
  """[T, n] -> [k, T, p]; block j holds features j p .. j p + p - 1, zero past n."""
  t, n = x_TN.shape
  if n == k * p:
    return x_TN.reshape(t, k, p).transpose(1, 0, 2)
  # Slices padded one by one fuse into one pass; a pad of x followed by the transpose does
  # not (XLA keeps the pad as its own full copy).
  parts = []
  for j in range(k):
    lo, hi = min(j * p, n), min((j + 1) * p, n)
    parts.append(jnp.pad(x_TN[:, lo:hi], ((0, 0), (0, p - (hi - lo)))))
  return jnp.stack(parts)


def _from_contiguous_blocks(x_KTP, n: int):
  k, t, p = x_KTP.shape
  return x_KTP.transpose(1, 0, 2).reshape(t, k * p)[:, :n]


def _strided_blocks(y_TN, k: int, s: int):
  """[T, n] -> [k, T, s]; block l holds features c k + l (c < s), zero past n."""
  t, n = y_TN.shape
  if n == k * s:
    return y_TN.reshape(t, s, k).transpose(2, 0, 1)
  parts = []
  for l in range(k):
    part = y_TN[:, l::k]
    parts.append(jnp.pad(part, ((0, 0), (0, s - part.shape[1]))))
  return jnp.stack(parts)


def _from_strided_blocks(y_KTS, n: int):
  k, t, s = y_KTS.shape
  return y_KTS.transpose(1, 2, 0).reshape(t, s * k)[:, :n]


def _stride_permute(h_KTQ):
  """[j, T, a] -> [l, T, a'] with j q + a = a' k + l (the permutation between the factors)."""
  k, t, q = h_KTQ.shape
  return h_KTQ.transpose(1, 0, 2).reshape(t, q, k).transpose(2, 0, 1)


def _stride_unpermute(h_KTR):
  k, t, r = h_KTR.shape
  return h_KTR.transpose(1, 2, 0).reshape(t, k, r).transpose(1, 0, 2)


# Accumulate in float32 and round once where the result is stored (as a bf16 einsum does).
def _blocks_times_factor(a_KTI, w_KOI):
  return jax.lax.dot_general(a_KTI, w_KOI, (((2,), (2,)), ((0,), (0,))),
                             preferred_element_type=jnp.float32)


def _blocks_times_factor_transposed(d_KTO, w_KOI):
  return jax.lax.dot_general(d_KTO, w_KOI, (((2,), (1,)), ((0,), (0,))),
                             preferred_element_type=jnp.float32)


def _factor_grad(d_KTO, a_KTI):
  return jax.lax.dot_general(d_KTO, a_KTI, (((1,), (1,)), ((0,), (0,))),
                             preferred_element_type=jnp.float32)


def _monarch_forward(x_TN, w1_KQP, w2_KSR, out_features: int):
  k, _, p = w1_KQP.shape
  x_KTP = _contiguous_blocks(x_TN, k, p)
  h_KTR = _stride_permute(_blocks_times_factor(x_KTP, w1_KQP)).astype(x_TN.dtype)
  y_TN = _from_strided_blocks(_blocks_times_factor(h_KTR, w2_KSR), out_features)
  return y_TN.astype(x_TN.dtype), (x_KTP, h_KTR, w1_KQP, w2_KSR)


def _monarch_backward(in_features: int, out_features: int, residuals, dy_TN):
  del out_features
  x_KTP, h_KTR, w1_KQP, w2_KSR = residuals
  k, s, _ = w2_KSR.shape
  dy_KTS = _strided_blocks(dy_TN, k, s)
  dh_KTQ = _stride_unpermute(_blocks_times_factor_transposed(dy_KTS, w2_KSR))
  dh_KTQ = dh_KTQ.astype(dy_TN.dtype)
  dw2 = _factor_grad(dy_KTS, h_KTR).astype(w2_KSR.dtype)
  dw1 = _factor_grad(dh_KTQ, x_KTP).astype(w1_KQP.dtype)
  dx = _from_contiguous_blocks(_blocks_times_factor_transposed(dh_KTQ, w1_KQP), in_features)
  return dx.astype(x_KTP.dtype), dw1, dw2


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _monarch_2d(in_features: int, out_features: int, x_TN, w1_KQP, w2_KSR):
  del in_features
  return _monarch_forward(x_TN, w1_KQP, w2_KSR, out_features)[0]


def _monarch_2d_forward(in_features, out_features, x_TN, w1_KQP, w2_KSR):
  del in_features
  return _monarch_forward(x_TN, w1_KQP, w2_KSR, out_features)


_monarch_2d.defvjp(_monarch_2d_forward, _monarch_backward)


def monarch_multiply(x, w1_KQP, w2_KSR, out_features: int):
  """x [..., n_in] (not padded) -> [..., out_features]: the Monarch product, copy-free layout.

  Equal to `monarch_multiply_reference` on the zero-padded x, cut to `out_features`.
  """
  k, q, p = w1_KQP.shape
  l, s, r = w2_KSR.shape
  n_in = x.shape[-1]
  if l != k or r != q or not 0 < n_in <= k * p or not 0 < out_features <= k * s:
    raise ValueError(f"monarch_multiply: x [..., {n_in}] -> {out_features} does not fit "
                     f"factors w1 {w1_KQP.shape} and w2 {w2_KSR.shape}")
  dtype = jnp.result_type(x, w1_KQP, w2_KSR)
  x, w1_KQP, w2_KSR = (a.astype(dtype) for a in (x, w1_KQP, w2_KSR))
  lead = x.shape[:-1]
  y = _monarch_2d(n_in, out_features, x.reshape(math.prod(lead), n_in), w1_KQP, w2_KSR)
  return y.reshape(*lead, out_features)


def _pallas_multiply(x, w1_KQP, w2_KSR, out_features: int):
  """The fused kernel with its platform default (an error where there is no kernel)."""
  from pallas_kernels.monarch import monarch  # pylint: disable=g-import-not-at-top
  dtype = jnp.result_type(x, w1_KQP, w2_KSR)
  return monarch(x.astype(dtype), w1_KQP.astype(dtype), w2_KSR.astype(dtype), out_features)


# model.linear.monarch_impl -> multiply(x, w1, w2, out_features); names match
# effjax.config.MONARCH_IMPLS. Tests run the TPU or Mosaic GPU kernel on a CPU by patching
# "pallas" with one that passes the interpreter's params.
MONARCH_MULTIPLIES = {"xla": monarch_multiply, "pallas": _pallas_multiply}


# Opcodes that only move data, and those that may ride along in a data-moving fusion.
_MOVES = frozenset({"transpose", "copy", "pad", "slice", "concatenate", "dynamic-slice",
                    "dynamic-update-slice", "gather", "reverse"})
_PASSIVE = frozenset({"parameter", "constant", "bitcast", "reshape", "broadcast", "convert",
                      "select", "compare", "iota", "tuple", "get-tuple-element"})
_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = (\w+)\[([\d,]*)\]\S* ([\w-]+)\(")


def activation_copies(hlo_text: str, min_elements: int) -> list[str]:
  """The passes in an optimised HLO module that only move an array of >= `min_elements`.

  A pass is an unfused copy/transpose/pad/slice/concatenate, or a fusion made of nothing but
  such data movement (and reshapes, bitcasts, converts): a full read and write of the array
  that computes nothing. Layout changes fused into a computing op (a dot, an elementwise
  op) are not counted. Pass `jax.jit(f).lower(...).compile().as_text()`.
  """
  computations, current = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      current = computations.setdefault(header.group(1), [])
    elif line.startswith("}"):
      current = None
    elif current is not None and _HLO_INSTRUCTION.match(line):
      current.append(line.strip())

  def parse(line):
    dtype_, dims, opcode = _HLO_INSTRUCTION.match(line).groups()
    del dtype_
    return opcode, math.prod(int(d) for d in dims.split(",") if d)

  fused = {c for lines in computations.values() for line in lines
           if parse(line)[0] == "fusion" for c in re.findall(r"calls=%([\w.\-]+)", line)}
  found = []
  for name, lines in computations.items():
    if name in fused:
      continue
    for line in lines:
      opcode, size = parse(line)
      if size < min_elements:
        continue
      if opcode == "fusion":
        body = {parse(b)[0] for b in computations[re.search(r"calls=%([\w.\-]+)", line)[1]]}
        if body & _MOVES and body <= _MOVES | _PASSIVE:
          found.append(line)
      elif opcode in _MOVES:
        found.append(line)
  return found


class MonarchLinear(nn.Module):
  """y = Monarch(x) [+ bias]: any in/out size, `nblocks` blocks, the paper's initialisation.

  The block axis of both factors carries the logical name "blocks" (mapped to the `tensor`
  mesh axis), so the two batched matmuls split over tensor-parallel devices; their second axis
  is "block_rows" (over `fsdp`, gathered for the multiply as any FSDP weight). `out_axis` names the bias. `impl` picks the multiply
  (MONARCH_MULTIPLIES: "xla", the copy-free XLA layout, or "pallas", the fused kernel); the
  parameters are the same for both.
  """
  features: int
  nblocks: int = 4
  use_bias: bool = False
  out_axis: str = "mlp"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  impl: str = "xla"

  @nn.compact
  def __call__(self, x):
    n_in = x.shape[-1]
    if self.impl not in MONARCH_MULTIPLIES:
      raise ValueError(f"MonarchLinear: impl={self.impl!r} is not one of "
                       f"{sorted(MONARCH_MULTIPLIES)}")
    where = f"MonarchLinear {'/'.join(self.scope.path) or self.name or ''}".rstrip()
    w1_shape, w2_shape = monarch_shapes(n_in, self.features, self.nblocks, where=where)

    def factor_init(key, shape, dtype):
      bound = 1.0 / math.sqrt(shape[-1])
      return jax.random.uniform(key, shape, dtype, -bound, bound)

    names = (BLOCKS, BLOCK_ROWS, None)
    w1 = self.param("w1", nn.with_logical_partitioning(factor_init, names), w1_shape,
                    self.param_dtype)
    w2 = self.param("w2", nn.with_logical_partitioning(factor_init, names), w2_shape,
                    self.param_dtype)
    multiply = MONARCH_MULTIPLIES[self.impl]
    y = multiply(x.astype(self.dtype), w1.astype(self.dtype), w2.astype(self.dtype),
                 self.features)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                              (self.out_axis,)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def _over_leading_axes(fn, n_core: int):
  """Maps `fn` over the axes that its array arguments have beyond their first `n_core`.

  Every positional argument is an array with the same leading axes; static values go in
  keyword arguments.
  """
  @functools.wraps(fn)
  def wrapped(*arrays, **static):
    f = functools.partial(fn, **static)
    for _ in range(arrays[0].ndim - n_core):
      f = jax.vmap(f)
    return f(*arrays)
  return wrapped


def _dense_from_factors(w1_KQP, w2_KSR, in_features: int, out_features: int):
  k, q, p = w1_KQP.shape
  _, s, r = w2_KSR.shape
  # Built as explicit block-diagonal matrices and permutations, independently of
  # monarch_multiply's reshapes, so the two can check each other.
  eye_KK = jnp.eye(k, dtype=w1_KQP.dtype)
  b1 = jnp.einsum("jqp,jm->jpmq", w1_KQP, eye_KK).reshape(k * p, k * q)  # [j p, j q]
  b2 = jnp.einsum("lsr,lm->lrms", w2_KSR, eye_KK).reshape(k * r, k * s)  # [l r, l s]
  perm1 = (np.arange(r)[None, :] * k + np.arange(k)[:, None]).reshape(-1)  # (l, a') <- a' k + l
  perm2 = (np.arange(s)[:, None] + np.arange(k)[None, :] * s).reshape(-1)  # (c, l) <- l s + c
  dense = jnp.matmul(b1[:, perm1], b2, precision=jax.lax.Precision.HIGHEST)[:, perm2]
  return dense[:in_features, :out_features]


def monarch_to_dense(params, in_features: int | None = None, out_features: int | None = None):
  """The dense W [in, out] (y = x @ W) of a MonarchLinear's params {"w1", "w2"[, "bias"]}.

  The bias is not part of W. Sizes default to the padded ones (k p, k s): pass the layer's
  real sizes to drop the padding. Extra leading axes (scanned layers) are mapped over.
  """
  w1, w2 = params["w1"], params["w2"]
  if w1.ndim < 3 or w1.ndim != w2.ndim or w1.shape[:-2] != w2.shape[:-2]:
    raise ValueError(f"monarch_to_dense: w1 {w1.shape} and w2 {w2.shape} are not the factors "
                     "of one Monarch layer ([..., k, q, p] and [..., k, s, r])")
  k, q, p = w1.shape[-3:]
  _, s, r = w2.shape[-3:]
  if r != q:
    raise ValueError(f"monarch_to_dense: w2's block input size {r} differs from w1's block "
                     f"output size {q} (w1 {w1.shape}, w2 {w2.shape})")
  n_in = k * p if in_features is None else in_features
  n_out = k * s if out_features is None else out_features
  if not (0 < n_in <= k * p and 0 < n_out <= k * s):
    raise ValueError(f"monarch_to_dense: sizes ({in_features}, {out_features}) do not fit "
                     f"factors of padded size ({k * p}, {k * s})")
  fn = _over_leading_axes(_dense_from_factors, 3)
  return fn(w1, w2, in_features=n_in, out_features=n_out)


def _projection_tables(k: int, q: int):
  """Static gather tables that route each (block pair, singular component) to w1 and w2."""
  # Channel a' of output block l comes from input block j = (a' k + l) // q.
  rr, ll = np.meshgrid(np.arange(q), np.arange(k), indexing="ij")  # [a', l]
  jj = (rr * k + ll) // q
  first = np.full((k, k), q, np.int64)
  np.minimum.at(first, (jj, ll), rr)
  comp = rr - first[jj, ll]  # which singular component of block (j, l) channel a' carries
  # w1 view: row a of input block j feeds channel a' = (j q + a) // k of block l = (j q + a) % k
  f = np.arange(k)[:, None] * q + np.arange(q)[None, :]  # [j, a]
  j1, l1 = np.broadcast_to(np.arange(k)[:, None], (k, q)), f % k
  c1 = f // k - first[j1, l1]
  w2_tables = (jj.T, ll.T, comp.T)  # indexed [l, a']
  return (j1, l1, c1), w2_tables


def _project_one(w_IO, nblocks: int):
  n_in, n_out = w_IO.shape
  (k, q, p), (_, s, r) = monarch_shapes(n_in, n_out, nblocks, where="project_to_monarch")
  a = jnp.zeros((k * p, k * s), w_IO.dtype).at[:n_in, :n_out].set(w_IO)
  # Blocks [j, l, p, s]: rows j p + b, columns c k + l. Zero padding is exact here: the SVD of
  # a zero-padded block is that of the real part with zero-padded singular vectors.
  blocks = jnp.transpose(a.reshape(k, p, s, k), (0, 3, 1, 2))
  u, sv, vt = jnp.linalg.svd(blocks, full_matrices=False)  # [j,l,p,m], [j,l,m], [j,l,m,s]
  root = jnp.sqrt(sv)
  (j1, l1, c1), (j2, l2, c2) = _projection_tables(k, q)
  if max(c1.max(), c2.max()) >= min(p, s):
    raise AssertionError(f"block rank exceeds min({p}, {s}); k={k}, q={q}")  # cannot happen
  w1 = u[j1, l1, :, c1] * root[j1, l1, c1][..., None]  # [k, q, p]
  w2 = jnp.swapaxes(vt[j2, l2, c2, :] * root[j2, l2, c2][..., None], -1, -2)  # [k, s, r]
  return {"w1": w1, "w2": w2}


def project_to_monarch(w, nblocks: int):
  """The Monarch params {"w1", "w2"} nearest to dense W [in, out] in Frobenius norm.

  Closed form (per-block truncated SVD, the square root of each singular value on each
  factor); exact when W already is Monarch with this `nblocks`. Extra leading axes are mapped
  over. Computed in float32 at least.
  """
  if w.ndim < 2:
    raise ValueError(f"project_to_monarch: W must be [..., in, out], got shape {w.shape}")
  w = w.astype(jnp.promote_types(w.dtype, jnp.float32))
  return _over_leading_axes(_project_one, 2)(w, nblocks=nblocks)
