"""Closed-form CNTK / CNNGP of the ConvRFM base network from patch Gram matrices.

The network (the paper's base kernel, as a neural-tangents `stax` model in NTK
parameterisation):

  depth x [Conv(q x q, stride 1, W_std = q, b_std = 0, padding), ABRelu(a=0, b=sqrt(2))],
  Flatten, Dense(1, W_std = 1, b_std = 0).

With a Flatten readout and no pooling only same-position covariances are needed. Writing
`g(i, j) = p_ij(x)^T M p_ij(x')` for the (metric-weighted) inner product of the stride-1
patches at output position (i, j), the recursion is, per position:

  layer 1:   K_1 = g / c,  Theta_1 = K_1                       (c: input channels)
  ReLU:      with cos(t) = K_l(x, x') / sqrt(K_l(x, x) K_l(x', x')),
             R_l = sqrt(K_l(x, x) K_l(x', x')) (sin t + (pi - t) cos t) / pi,
             D_l = (pi - t) / pi,  R_l(x, x) = K_l(x, x)
  layer l+1: K_{l+1} = W_std^2 * mean over the q x q window of R_l = window sum of R_l,
             Theta_{l+1} = window sum of (Theta_l D_l + R_l)
             (window padded like the conv: zeros for SAME, wrap-around for CIRCULAR)
  readout:   NNGP = spatial mean of R_depth, NTK = spatial mean of (Theta_depth D_depth + R_depth).

Every kernel entry costs O(H' W' depth) work: window sums are separable (q adds per axis),
and no array is q^2 times larger than the Gram matrices. Internally the spatial axes lead,
`(H', W', n1, n2)`, so that the inner loops vectorise over the batch pairs.

Zero patches (common after a low-rank metric) give K(x, x) = 0 at some positions; there the
angle t is undefined. The ReLU kernels use a `custom_jvp` with the exact derivatives
`dR/dK12 = D`, `dR/dK11 = sqrt(K11 K22 - K12^2) / (2 pi K11)` and
`dD/dK12 = 1 / (pi sqrt(K11 K22 - K12^2))`, guarded with the double-`where` trick; at a zero
position (or at t in {0, pi}, where D has a kink) they take the symmetric (two-sided average)
limit: D = 1/2 at zero, and the singular partial derivatives are 0. Kernels and gradients
are therefore finite everywhere.

References:
  S. Arora, S. S. Du, W. Hu, Z. Li, R. Salakhutdinov, R. Wang. On Exact Computation with an
  Infinitely Wide Neural Net. NeurIPS 2019 (CNTK recursion).
  Y. Cho, L. K. Saul. Kernel Methods for Deep Learning. NeurIPS 2009 (arc-cosine kernel).
  R. Novak et al. Neural Tangents. ICLR 2020 (NTK parameterisation, `diagonal_spatial`).
  D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
  convolutional neural networks. arXiv:2309.00570, 2023 (the ConvRFM base kernel).
"""

import dataclasses
import enum
import functools
import math
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from jconvrfm._src import checks
from jconvrfm._src import patches as patches_lib
from jconvrfm._src import processes
from jconvrfm._src import tiling
from jconvrfm._src.kernels import native


class Kind(enum.Enum):
  """Which infinite-width kernel: the NTK or the NNGP (output covariance at init)."""
  NTK = 'ntk'
  NNGP = 'nngp'


def canonical_kind(kind: Union[str, Kind], name: str = 'kind') -> Kind:
  """Normalises `'ntk'` / `'nngp'` (any case) or a `Kind` to `Kind`."""
  return checks.canonical_enum(kind, Kind, name)


# --------------------------------------------------------------------------------------------
# Window sums over the two leading (spatial) axes.
# --------------------------------------------------------------------------------------------


def _pad_axis(a: jax.Array, axis: int, before: int, after: int,
              padding: checks.Padding) -> jax.Array:
  if before == 0 and after == 0:
    return a
  if padding == checks.Padding.CIRCULAR:
    size = a.shape[axis]
    idx = [k % size for k in range(-before, size + after)]
    return jnp.take(a, jnp.asarray(idx), axis=axis)
  widths = [(0, 0)] * a.ndim
  widths[axis] = (before, after)
  return jnp.pad(a, widths)


def _window_sum_axis(a: jax.Array, axis: int, q: int, padding: checks.Padding) -> jax.Array:
  """Sum over a length-q sliding window (stride 1) along `axis`, padded like the conv."""
  before, after, _ = patches_lib.padding_amounts(a.shape[axis], q, 1, padding)
  if padding == checks.Padding.CIRCULAR:
    a = _pad_axis(a, axis, before, after, padding)
    before = after = 0
  window = [1] * a.ndim
  window[axis] = q
  pads = [(0, 0)] * a.ndim
  pads[axis] = (before, after)
  # One reduce_window per axis: XLA keeps the (expensive) producer fused once, whereas q
  # shifted slices make it recompute the producer for every slice.
  # The init value must be concrete (numpy) for jax to pick the differentiable window-sum
  # primitive; a traced zero would give a generic reduce_window without reverse-mode rules.
  return jax.lax.reduce_window(a, np.zeros((), a.dtype), jax.lax.add, tuple(window),
                               (1,) * a.ndim, tuple(pads))


def _window_sum(a: jax.Array, q: int, padding: checks.Padding) -> jax.Array:
  """q x q window sums over axes 0 and 1 (separable: 2q adds per output entry)."""
  return _window_sum_axis(_window_sum_axis(a, 0, q, padding), 1, q, padding)


# --------------------------------------------------------------------------------------------
# The ReLU (ABRelu(0, sqrt 2)) kernel maps with finite derivatives everywhere.
# --------------------------------------------------------------------------------------------


@jax.custom_jvp
def relu_kernels(k11: jax.Array, k22: jax.Array,
                 k12: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Post-activation covariance R and derivative kernel D of `sqrt(2) * relu`.

  Args:
    k11: pre-activation variances of the first input, any shape broadcastable with `k12`.
    k22: pre-activation variances of the second input, broadcastable with `k12`.
    k12: pre-activation covariances.

  Returns:
    `(R, D)` with `R = sqrt(k11 k22) (sin t + (pi - t) cos t) / pi` and `D = (pi - t) / pi`,
    `cos t = k12 / sqrt(k11 k22)`; at `k11 k22 = 0`: `R = 0`, `D = 1/2`. dtype of `k12`.
  """
  return _relu_primal(k11, k22, k12)[:2]


# Abramowitz & Stegun 4.4.46: arccos(a) = sqrt(1 - a) * sum_k c_k a^k for 0 <= a <= 1, with
# absolute error <= 2e-8, below float32 resolution. XLA's arccos on CPU is a slow scalar
# call; this polynomial vectorises. Used only for dtypes with at most float32 precision.
_ACOS_COEFFS = (1.5707963050, -0.2145988016, 0.0889789874, -0.0501743046, 0.0308918810,
                -0.0170881256, 0.0066700901, -0.0012624911)


def _arccos(x: jax.Array) -> jax.Array:
  """arccos for x in [-1, 1]: exact `jnp.arccos` in float64, A&S 4.4.46 otherwise."""
  if jnp.finfo(x.dtype).bits > 32:
    return jnp.arccos(x)
  a = jnp.abs(x)
  poly = jnp.full_like(a, _ACOS_COEFFS[-1])
  for coeff in _ACOS_COEFFS[-2::-1]:
    poly = poly * a + coeff
  r = jnp.sqrt(jnp.maximum(1 - a, 0)) * poly
  return jnp.where(x >= 0, r, math.pi - r)


def _relu_primal(k11, k22, k12):
  """`(R, D, ok, sin t, inv_sqrt_k11, inv_sqrt_k22)`; k11, k22 may be broadcast (per image).

  Square roots and inverses are taken of `k11` and `k22` separately: in the recursion they
  have one entry per image and position, not per pair, so the per-pair work is only
  multiplications, one square root (sin t) and the arccos polynomial. (XLA's CPU `rsqrt` of
  the per-pair product cost as much as everything else together.)
  """
  ok1 = k11 > 0
  ok2 = k22 > 0
  sqrt1 = jnp.sqrt(jnp.where(ok1, k11, jnp.zeros_like(k11)))
  sqrt2 = jnp.sqrt(jnp.where(ok2, k22, jnp.zeros_like(k22)))
  inv1 = jnp.where(ok1, 1 / jnp.where(ok1, sqrt1, jnp.ones_like(sqrt1)), jnp.zeros_like(sqrt1))
  inv2 = jnp.where(ok2, 1 / jnp.where(ok2, sqrt2, jnp.ones_like(sqrt2)), jnp.zeros_like(sqrt2))
  ok = ok1 & ok2
  norm = sqrt1 * sqrt2  # sqrt(k11 k22)
  # Rounding can push |cos t| a hair above 1; arccos would return NaN there.
  cos = jnp.clip(k12 * (inv1 * inv2), -1, 1)
  # sin t from (1 - c)(1 + c), which is exact in c, so that sin t and t = arccos(c) agree to
  # rounding even for t -> 0 (e.g. K(x, x)); sqrt(k11 k22 - k12^2) would amplify rounding
  # noise of 1e-16 to 1e-8 there, and deeper layers would amplify that again.
  sin = jnp.sqrt((1 - cos) * (1 + cos))
  theta = _arccos(cos)
  inv_pi = 1 / math.pi
  # R = norm (sin t + (pi - t) cos t) / pi, written as k12 + norm (sin t - t cos t) / pi:
  # sin t - t cos t = t^3 / 3 + O(t^5) is well conditioned near t = 0.
  r = jnp.where(ok, k12 + norm * (sin - theta * cos) * inv_pi, jnp.zeros_like(k12))
  d = jnp.where(ok, (math.pi - theta) * inv_pi, jnp.full_like(k12, 0.5))
  return r, d, ok, sin, cos, sqrt1, sqrt2, inv1, inv2


def _relu_partials(k11, k22, k12):
  """`R`, `D` and their six partial derivatives w.r.t. `(k11, k22, k12)`.

  With `s1 = sqrt(k11)`, `s2 = sqrt(k22)`, `cos t = k12 / (s1 s2)`:
  `dR/dk12 = D`, `dR/dk11 = sin t s2 / (2 pi s1)`, `dD/dk12 = 1 / (pi s1 s2 sin t)`,
  `dD/dk11 = -cos t / (2 pi k11 sin t)` (and `k11 <-> k22`). Where they are singular (a zero
  variance, or t in {0, pi}) the singular ones are 0 (the symmetric limit, see the module
  docstring).
  """
  r, d, ok, sin, cos, sqrt1, sqrt2, inv1, inv2 = _relu_primal(k11, k22, k12)
  smooth = ok & (sin > 0)
  zero = jnp.zeros_like(r)
  inv_sin = jnp.where(smooth, 1 / jnp.where(smooth, sin, jnp.ones_like(sin)), zero)
  inv_2pi = 1 / (2 * math.pi)
  dr_dk11 = jnp.where(smooth, sin * (sqrt2 * inv1 * inv_2pi), zero)
  dr_dk22 = jnp.where(smooth, sin * (sqrt1 * inv2 * inv_2pi), zero)
  dd_dk12 = inv_sin * (inv1 * inv2 * (1 / math.pi))
  cos_inv_sin = cos * inv_sin
  dd_dk11 = cos_inv_sin * (-(inv1 * inv1) * inv_2pi)
  dd_dk22 = cos_inv_sin * (-(inv2 * inv2) * inv_2pi)
  return r, d, (dr_dk11, dr_dk22, d), (dd_dk11, dd_dk22, dd_dk12)


@relu_kernels.defjvp
def _relu_kernels_jvp(primals, tangents):
  k11, k22, k12 = primals
  dk11, dk22, dk12 = tangents
  r, d, (r11, r22, r12), (d11, d22, d12) = _relu_partials(k11, k22, k12)
  dr = r12 * dk12 + r11 * dk11 + r22 * dk22
  dd = d12 * dk12 + d11 * dk11 + d22 * dk22
  return (r, d), (dr, dd)


# --------------------------------------------------------------------------------------------
# Patch Gram matrices.
# --------------------------------------------------------------------------------------------


def _grams_identity(x1, x2, q, padding):
  """Grams for M = I via per-pixel dot products and window sums: (H', W', n1, n2) etc."""
  pix12 = jnp.einsum('ahwc,bhwc->hwab', x1, x2)
  pix1 = jnp.einsum('ahwc,ahwc->hwa', x1, x1)
  pix2 = jnp.einsum('ahwc,ahwc->hwa', x2, x2)
  return (_window_sum(pix12, q, padding), _window_sum(pix1, q, padding),
          _window_sum(pix2, q, padding))


def _grams_metric(x1, x2, metric, q, padding):
  """Grams `p^T M p'` from explicit patches: (H', W', n1, n2), (H', W', n1), (H', W', n2)."""
  p1 = patches_lib._patches(x1, q, 1, padding)  # pylint: disable=protected-access
  p2 = patches_lib._patches(x2, q, 1, padding)  # pylint: disable=protected-access
  mp2 = jnp.einsum('bhwd,ed->bhwe', p2, metric)
  mp1 = jnp.einsum('ahwd,ed->ahwe', p1, metric)
  g12 = jnp.einsum('ahwd,bhwd->hwab', p1, mp2)
  g1 = jnp.einsum('ahwd,ahwd->hwa', p1, mp1)
  g2 = jnp.einsum('bhwd,bhwd->hwb', p2, mp2)
  return g12, g1, g2


def _grams_internal(x1, x2, metric, q, padding):
  if metric is None:
    return _grams_identity(x1, x2, q, padding)
  return _grams_metric(x1, x2, metric, q, padding)


@functools.partial(jax.jit, static_argnames=('q', 'padding'))
def _patch_grams_jit(x1, x2, metric, q, padding):
  g12, g1, g2 = _grams_internal(x1, x2, metric, q, padding)
  return (jnp.transpose(g12, (2, 3, 0, 1)), jnp.transpose(g1, (2, 0, 1)),
          jnp.transpose(g2, (2, 0, 1)))


def _check_pair(x1, x2, q: int, padding: checks.Padding):
  x1 = checks.check_nhwc(x1, 'x1')
  x2 = x1 if x2 is None else checks.check_nhwc(x2, 'x2')
  if x1.shape[1:] != x2.shape[1:]:
    raise ValueError(
        '`x1` and `x2` must have the same height, width and channels, got shapes '
        f'{tuple(x1.shape)} and {tuple(x2.shape)}.')
  if x1.dtype != x2.dtype:
    raise TypeError(f'`x1` and `x2` must have the same dtype, got {x1.dtype} and {x2.dtype}.')
  _, height, width, _ = x1.shape
  if padding == checks.Padding.VALID and (q > height or q > width):
    raise ValueError(
        f'`patch_size` ({q}) must not exceed the image height and width ({height} x {width}) '
        'with VALID padding.')
  return x1, x2


def _check_metric(metric, d: int, dtype) -> Optional[jax.Array]:
  if metric is None:
    return None
  metric = checks.check_symmetric_psd(metric, 'metric', size=d)
  if metric.dtype != dtype:
    raise TypeError(f'`metric` must have the dtype of the images ({dtype}), got '
                    f'{metric.dtype}.')
  return metric


def patch_grams(x1: jax.Array,
                x2: Optional[jax.Array] = None,
                *,
                patch_size: int,
                padding: Union[str, checks.Padding] = 'VALID',
                metric: Optional[jax.Array] = None
                ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Metric-weighted inner products of same-position stride-1 patches.

  Args:
    x1: images `(n1, H, W, c)` (NHWC), real floating dtype (kept).
    x2: images `(n2, H, W, c)`, same dtype, or None for `x1`.
    patch_size: q, side of the square patch.
    padding: `'VALID'`, `'SAME'` or `'CIRCULAR'` (as in `jconvrfm.patches`).
    metric: `M`, symmetric PSD `(d, d)` with `d = q*q*c` in Flax kernel order
      (`(u*q + v)*c + ch`), same dtype as the images; None means the identity.

  Returns:
    `(gram12, sq1, sq2)` with shapes `(n1, n2, H', W')`, `(n1, H', W')`, `(n2, H', W')`:
    `gram12[a, b, i, j] = p_ij(x1_a)^T M p_ij(x2_b)`, `sq1[a, i, j] = p_ij(x1_a)^T M
    p_ij(x1_a)`, `sq2` likewise for `x2`. dtype of the images.

  Example:
    >>> import jax.numpy as jnp
    >>> from jconvrfm._src.kernels.fused import patch_grams
    >>> x = jnp.ones((2, 5, 5, 1), jnp.float32)
    >>> g12, s1, s2 = patch_grams(x, patch_size=3)
    >>> g12.shape, float(g12[0, 1, 0, 0])
    ((2, 2, 3, 3), 9.0)
  """
  pad = checks.canonical_padding(padding)
  q = checks.check_positive_int(patch_size, 'patch_size')
  x1, x2 = _check_pair(x1, x2, q, pad)
  metric = _check_metric(metric, q * q * x1.shape[-1], x1.dtype)
  return _patch_grams_jit(x1, x2, metric, q, pad)


# --------------------------------------------------------------------------------------------
# Depth recursion.
# --------------------------------------------------------------------------------------------


def _kernel_from_grams_internal(g12, g1, g2, depth, q, padding, channels, kind):
  """Recursion on spatial-leading grams (H', W', n1, n2), (H', W', n1), (H', W', n2)."""
  inv_c = 1 / channels
  k12 = g12 * inv_c
  k11 = (g1 * inv_c)[:, :, :, None]
  k22 = (g2 * inv_c)[:, :, None, :]
  theta = k12 if kind == Kind.NTK else None
  for layer in range(depth):
    r, d = relu_kernels(k11, k22, k12)
    if layer == depth - 1:
      out = r if kind == Kind.NNGP else theta * d + r
      return jnp.mean(out, axis=(0, 1))
    # Next conv: W_std^2 * window mean = window sum (W_std = q). The self covariances pass
    # through the ReLU unchanged (E[2 relu(z)^2] = E[z^2]).
    k12 = _window_sum(r, q, padding)
    k11 = _window_sum(k11, q, padding)
    k22 = _window_sum(k22, q, padding)
    if kind == Kind.NTK:
      theta = _window_sum(theta * d + r, q, padding)


def _self_kernel_internal(g1, depth, q, padding, channels, kind):
  """K(x_a, x_a) from self Grams (H', W', n): the angle is exactly 0 at every layer.

  Then R = K and D = 1, so the recursion is linear. Evaluating the diagonal of a symmetric
  kernel matrix this way avoids the arccos kink at cos t = 1, where rounding of eps in cos t
  moves t by sqrt(2 eps) (about 5e-4 in float32, 1e-8 in float64).
  """
  k = g1 * (1 / channels)
  theta = k
  for layer in range(depth):
    if layer == depth - 1:
      out = k if kind == Kind.NNGP else theta + k
      return jnp.mean(out, axis=(0, 1))
    theta = _window_sum(theta + k, q, padding)
    k = _window_sum(k, q, padding)


def _window_sum_transpose(ct: jax.Array, in_shape, q: int,
                          padding: checks.Padding) -> jax.Array:
  """Adjoint of `_window_sum` (a linear map from `in_shape`), applied to `ct`."""
  fn = lambda a: _window_sum(a, q, padding)
  return jax.linear_transpose(fn, jax.ShapeDtypeStruct(in_shape, ct.dtype))(ct)[0]


def kernel_and_gram_grads_internal(g12, g1, g2, depth, q, padding, channels, kind):
  """Kernel and its exact gradients w.r.t. the Grams, by a hand-written reverse pass.

  Spatial-leading layout: `g12` `(H', W', n1, n2)`, `g1` `(H', W', n1)`, `g2` `(H', W', n2)`.
  The self Grams enter every pair's kernel, so their gradients are returned *per pair*
  (`dK[a, b] / d g1[., ., a]` restricted to the entry `(a, b)`), which is what the patch AGOP
  of a kernel predictor needs (`predictor_agop`).

  The forward pass keeps only each layer's inputs (`k12`, and `theta` for the NTK; `k11`,
  `k22` are per image), and the backward pass recomputes the ReLU map's six partial
  derivatives from them (the same values as the `custom_jvp` of `relu_kernels`, so the result
  equals reverse-mode autodiff of `_kernel_from_grams_internal` to rounding). Keeping the
  partials instead means six more pair-sized arrays per layer through memory; recomputing
  them ran 10-15% faster on a 2-core CPU. With `u_l` the adjoint of layer l's output
  (`theta_l D_l + R_l` for the NTK, `R_l` for the NNGP) and `v_l` that of `R_l` through the
  next layer's covariance:
  `adj R_l = u_l + v_l`, `adj D_l = u_l theta_l`, `adj theta_l = u_l D_l`,
  `adj k12_l = adj R_l dR/dk12 + adj D_l dD/dk12` (likewise `k11`, `k22`), and window sums
  go back through their transposes.

  Returns:
    `(K (n1, n2), dK/dg12, dK/dg1, dK/dg2)`, the last three `(H', W', n1, n2)`.
  """
  inv_c = 1 / channels
  ntk = kind == Kind.NTK
  k12 = g12 * inv_c
  k11 = (g1 * inv_c)[:, :, :, None]
  k22 = (g2 * inv_c)[:, :, None, :]
  theta = k12 if ntk else None
  inputs = []                                   # (k11, k22, k12, theta) of every layer
  for layer in range(depth):
    r, d = relu_kernels(k11, k22, k12)
    inputs.append((k11, k22, k12, theta))
    if layer < depth - 1:
      next_k12 = _window_sum(r, q, padding)
      k11 = _window_sum(k11, q, padding)
      k22 = _window_sum(k22, q, padding)
      if ntk:
        theta = _window_sum(theta * d + r, q, padding)
      k12 = next_k12
  positions = r.shape[0] * r.shape[1]
  value = jnp.mean(theta * d + r if ntk else r, axis=(0, 1))
  u = jnp.full_like(r, 1 / positions)
  v = carry11 = carry22 = None
  for layer in reversed(range(depth)):
    k11_l, k22_l, k12_l, theta_l = inputs[layer]
    _, d_l, (r11, r22, r12), (d11, d22, d12) = _relu_partials(k11_l, k22_l, k12_l)
    if v is None:
      adj_r = u
    else:
      adj_r = v + u if ntk else v
    adj_k12 = adj_r * r12
    adj_k11 = adj_r * r11
    adj_k22 = adj_r * r22
    if ntk:
      adj_d = u * theta_l
      adj_k12 = adj_k12 + adj_d * d12
      adj_k11 = adj_k11 + adj_d * d11
      adj_k22 = adj_k22 + adj_d * d22
    if carry11 is not None:
      adj_k11 = adj_k11 + carry11
      adj_k22 = adj_k22 + carry22
    if layer == 0:
      if ntk:
        adj_k12 = adj_k12 + u * d_l               # theta_0 = k12_0
      return value, adj_k12 * inv_c, adj_k11 * inv_c, adj_k22 * inv_c
    prev_shape = inputs[layer - 1][2].shape
    back = lambda a: _window_sum_transpose(a, prev_shape, q, padding)
    carry11, carry22 = back(adj_k11), back(adj_k22)
    v = back(adj_k12)
    if ntk:
      u = back(u * d_l)                           # adj theta_l, one layer down


@functools.partial(jax.jit, static_argnames=('depth', 'q', 'padding', 'kind'))
def fused_self_kernel(x, metric, depth, q, padding, kind):
  """Unchecked `(n,)` diagonal `K(x_a, x_a)` of the fused kernel (exact angle 0)."""
  if metric is None:
    pix = jnp.einsum('ahwc,ahwc->hwa', x, x)
    g1 = _window_sum(pix, q, padding)
  elif metric.shape[0] <= _MAX_PRECOMPUTED_PATCH_DIM:
    p = patches_lib._patches(x, q, 1, padding)  # pylint: disable=protected-access
    g1 = jnp.einsum('ahwd,ed,ahwe->hwa', p, metric, p)
  else:
    # Large patch dimensions: squared norms of the features `F^T p`, a few images at a time
    # (the patches of all images would take q^2 times their memory).
    t_sq = lambda t: jnp.sum(t * t, axis=-1)
    g1 = jnp.moveaxis(_metric_features(x, metric_factor(metric), q, padding, t_sq), 0, -1)
  return _self_kernel_internal(g1, depth, q, padding, x.shape[-1], kind)


@functools.partial(jax.jit,
                   static_argnames=('depth', 'q', 'padding', 'channels', 'kind'))
def _kernel_from_grams_jit(gram12, sq1, sq2, depth, q, padding, channels, kind):
  return _kernel_from_grams_internal(
      jnp.transpose(gram12, (2, 3, 0, 1)), jnp.transpose(sq1, (1, 2, 0)),
      jnp.transpose(sq2, (1, 2, 0)), depth, q, padding, channels, kind)


def check_depth_fits(height: int, width: int, depth: int, q: int,
                     padding: checks.Padding) -> None:
  """Raises if VALID convolutions shrink the (H', W') map to nothing before `depth`."""
  if padding != checks.Padding.VALID:
    return
  h_last = height - (depth - 1) * (q - 1)
  w_last = width - (depth - 1) * (q - 1)
  if h_last < 1 or w_last < 1:
    raise ValueError(
        f'`depth` ({depth}) is too large for a {height} x {width} map with `patch_size` {q} '
        'and VALID padding (each layer removes q - 1 rows and columns); use a smaller depth '
        'or SAME/CIRCULAR padding.')


def conv_kernel_from_grams(gram12: jax.Array,
                           sq1: jax.Array,
                           sq2: jax.Array,
                           *,
                           depth: int,
                           patch_size: int,
                           padding: Union[str, checks.Padding] = 'VALID',
                           channels: int,
                           kind: Union[str, Kind] = 'ntk') -> jax.Array:
  """Infinite-width NTK or NNGP of the ConvRFM base CNN from patch Gram matrices.

  Pure and differentiable in all three Gram arrays (finite gradients at zero patches);
  safe under `jit`, `vmap` and `grad` (shape arguments are static).

  Args:
    gram12: `(n1, n2, H', W')` cross Grams `p_ij(x1_a)^T M p_ij(x2_b)` (see `patch_grams`).
    sq1: `(n1, H', W')` self Grams of `x1`; must be >= 0.
    sq2: `(n2, H', W')` self Grams of `x2`; must be >= 0.
    depth: number of Conv + ReLU blocks (>= 1).
    patch_size: q, the conv window of every layer.
    padding: padding of the layers after the first (`'VALID'`, `'SAME'`, `'CIRCULAR'`);
      the first layer's padding is already in the Grams.
    channels: c, input channels (the first layer divides by `fan_in / q^2 = c`).
    kind: `'ntk'` or `'nngp'`.

  Returns:
    `(n1, n2)` kernel, dtype of `gram12`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jconvrfm._src.kernels.fused import patch_grams, conv_kernel_from_grams
    >>> x = jnp.ones((2, 7, 7, 1), jnp.float32)
    >>> k = conv_kernel_from_grams(*patch_grams(x, patch_size=3), depth=2, patch_size=3,
    ...                            channels=1)
    >>> k.shape
    (2, 2)
  """
  kind = canonical_kind(kind)
  pad = checks.canonical_padding(padding)
  depth = checks.check_positive_int(depth, 'depth')
  q = checks.check_positive_int(patch_size, 'patch_size')
  channels = checks.check_positive_int(channels, 'channels')
  gram12 = checks.check_array(gram12, 'gram12', 4, layout='(n1, n2, H\', W\')')
  sq1 = checks.check_array(sq1, 'sq1', 3, layout='(n1, H\', W\')')
  sq2 = checks.check_array(sq2, 'sq2', 3, layout='(n2, H\', W\')')
  n1, n2, h, w = gram12.shape
  if sq1.shape != (n1, h, w) or sq2.shape != (n2, h, w):
    raise ValueError(
        f'`sq1` and `sq2` must have shapes {(n1, h, w)} and {(n2, h, w)} to match `gram12` '
        f'{tuple(gram12.shape)}, got {tuple(sq1.shape)} and {tuple(sq2.shape)}.')
  check_depth_fits(h, w, depth, q, pad)
  return _kernel_from_grams_jit(gram12, sq1, sq2, depth, q, pad, channels, kind)


@dataclasses.dataclass(frozen=True)
class GramConvKernel:
  """The fused CNTK / CNNGP as a function of patch Grams, with a hand-written gradient.

  Calling it is `conv_kernel_from_grams` with these settings; `grads_spatial_leading` is
  `kernel_and_gram_grads_internal` (unchecked, spatial-leading layout), which
  `predictor_agop.predictor_agop_from_grams` uses instead of autodiff when present. Frozen
  and hashable, so jitted callers compile once per configuration.

  Attributes:
    depth: Conv + ReLU blocks.
    patch_size: q.
    padding: padding of the layers after the first.
    channels: input channels c.
    kind: NTK or NNGP.
  """
  depth: int
  patch_size: int
  padding: checks.Padding
  channels: int
  kind: Kind = Kind.NTK

  def __call__(self, gram12: jax.Array, sq1: jax.Array, sq2: jax.Array) -> jax.Array:
    return conv_kernel_from_grams(gram12, sq1, sq2, depth=self.depth,
                                  patch_size=self.patch_size, padding=self.padding,
                                  channels=self.channels, kind=self.kind)

  def grads_spatial_leading(self, g12: jax.Array, g1: jax.Array, g2: jax.Array):
    """`(K, dK/dg12, dK/dg1, dK/dg2)` for `(H', W', n1, n2)`, `(H', W', n1)`, `(H', W', n2)`.

    Always the XLA path: the native `native.kernel_and_gram_grads` writes three pair-sized
    arrays that the contractions then read back, and routed here it made the whole 800-image
    AGOP slower on a 2-core CPU (17.8-18.4 s against 13.6-14.6 s per round, 2026-11-29). The
    native AGOP path (`native_agop_rows`) fuses the contractions instead.
    """
    return kernel_and_gram_grads_internal(g12, g1, g2, self.depth, self.patch_size,
                                          self.padding, self.channels, self.kind)

  def native_agop_rows(self, pz, mpz, sqz, zidx, blocks):
    """Per-sample predictor-AGOP sums through the native custom call (float32, CPU).

    See `native.predictor_agop_rows`; `predictor_agop.predictor_agop_from_grams` calls it.
    """
    return native.predictor_agop_rows(pz, mpz, sqz, zidx, blocks, self.depth, self.patch_size,
                                      self.padding, self.channels, self.kind == Kind.NTK)


# Pairs per tile times spatial positions: ~2^19 keeps a tile's intermediates (2 MiB each in
# float32) near the CPU's caches; measured on a 2-core shared CPU, tiles of 16 x 32 pairs on
# 40 x 40 maps ran 2-4x faster than whole (H', W', n1, n2) arrays streamed through memory.
_TILE_ELEMENTS = 1 << 19
# On accelerators sequential tile loops cost launches; tiles as large as memory comfortably
# allows (2^26 elements: 256 MiB per float32 intermediate) are used instead.
_TILE_ELEMENTS_ACCELERATOR = 1 << 26


def tile_shape(n1: int, n2: int, positions: int,
               tile_elements: int = _TILE_ELEMENTS) -> Tuple[int, int]:
  """Tile `(b1, b2)` over kernel entries with `b1 * b2 * positions` about `tile_elements`.

  `b2` is the vectorised inner axis: 16 or 32 (whichever pads `n2` less), so that it fills
  whole SIMD registers (a ragged width such as 29 left masked remainder loops and ran about
  2x slower on an AVX-512 CPU); `n2` itself when smaller. `b1` is balanced so that padding the
  last tile wastes little.
  """
  pairs = max(tile_elements // max(positions, 1), 1)
  if n2 <= 16 or pairs < 16:
    b2 = tiling.balanced_block(n2, min(n2, 16, pairs))
  else:
    b2 = min((32, 16), key=lambda b: (-(-n2 // b) * b, -b))
  b1 = tiling.balanced_block(n1, min(n1, max(pairs // b2, 1)))
  return b1, b2


def _pad_batch(x: jax.Array, multiple: int) -> jax.Array:
  extra = -x.shape[0] % multiple
  if extra == 0:
    return x
  # Zero images give finite (zero) kernel rows and finite gradients; the rows are dropped.
  return jnp.concatenate([x, jnp.zeros((extra,) + x.shape[1:], x.dtype)], axis=0)


# Patch dimension up to which the metric path precomputes every image's patches and `M p` once
# per call (memory n * H' W' * d per operand, q^2 times the images), whatever the memory.
_MAX_PRECOMPUTED_PATCH_DIM = 64
# Beyond it the patches are still precomputed once per call while they take at most this many
# bytes (both operands together); only larger calls (deep layers with many channels over many
# images) form the patches and `M p` of each tile inside the tile loop, which repeats the
# `d x d` products for every tile an image meets. (Star task, q = 11, d = 363: a 1000 x 50
# block with a learned metric took 5.4 s with per-tile patches, 3.4 s with precomputed ones,
# on a 2-core CPU.)
_MAX_PRECOMPUTED_BYTES = 1 << 30


def _precomputes_patches(n1: int, n2: int, positions: int, d: int, itemsize: int) -> bool:
  """Whether `fused_conv_kernel`'s metric path forms every image's patches once per call."""
  return (d <= _MAX_PRECOMPUTED_PATCH_DIM or
          (n1 + n2) * positions * d * itemsize <= _MAX_PRECOMPUTED_BYTES)


def metric_argument(metric: jax.Array) -> Optional[jax.Array]:
  """The `metric` argument for `fused_conv_kernel` / `fused_self_kernel` in a metric loop.

  Returns `metric` itself, the identity included, for patch dimensions up to 64: the metric
  path then precomputes every image's patches once, costs about what the identity path does,
  and one compiled program serves every metric (ConvRFM's round 0 and later rounds). For
  larger patch dimensions (deep layers with many channels) an exact identity returns None,
  the identity path, which avoids `d x d` products per patch.
  """
  if metric.shape[0] <= _MAX_PRECOMPUTED_PATCH_DIM or not checks.is_identity(metric):
    return metric
  return None


def _fused_block(x1, x2, metric, depth, q, padding, kind):
  g12, g1, g2 = _grams_internal(x1, x2, metric, q, padding)
  return _kernel_from_grams_internal(g12, g1, g2, depth, q, padding, x1.shape[-1], kind)


def _patch_features(x, metric, q, padding, block, side):
  """Per-block patch features of one side of the kernel matrix, computed once per call.

  Side 1 gets its patches `p`, side 2 its patches times the metric, `M p`, each as
  `(blocks, H', W', block, d)` and `(blocks, H', W', d, block)`, and both their squared M-norms `p^T M p` `(blocks, H', W',
  block)`. Positions lead and images follow, the layout of the tile recursion; the cross Gram
  of two tiles is then one batched matmul `(H', W', b1, d) @ (H', W', d, b2)`. Only what a tile
  reads is kept, so the tile loop slices no unused arrays.
  """
  p = patches_lib._patches(x, q, 1, padding)  # pylint: disable=protected-access
  mp = p @ metric
  sq = jnp.sum(p * mp, axis=-1)
  return _split_features(p if side == 1 else mp, sq, block, side)


def _split_features(f, sq, block, side):
  """`f` `(n, H', W', d)`, `sq` `(n, H', W')` in tile-loop layout (see `_patch_features`)."""
  n = f.shape[0]

  def split(a):
    a = a.reshape((n // block, block) + a.shape[1:])
    return jnp.moveaxis(a, 1, 3)
  if side == 1:
    return split(f), split(sq)
  return jnp.swapaxes(split(f), -1, -2), split(sq)     # (blocks, H', W', d, block)


def _num_blocks(features) -> int:
  return jax.tree.leaves(features)[0].shape[0]


def _fused_block_from_features(f1, f2, depth, q, padding, channels, kind):
  p1, sq1 = f1
  mp2_t, sq2 = f2
  g12 = jnp.matmul(p1, mp2_t)                               # (H', W', b1, b2)
  return _kernel_from_grams_internal(g12, sq1, sq2, depth, q, padding, channels, kind)


def _native_applies(x1, x2, metric, q, padding) -> bool:
  """Whether a float32 call on a CPU takes the native custom call (`native.py`).

  Only where the CPU is the default backend (so that GPU and TPU hosts never build it), for
  float32, and for patch dimensions up to `native.MAX_PATCH_DIM` (see there); above it only
  for the identity metric (`metric=None`), which the native call computes from pixels.
  """
  if jax.default_backend() != 'cpu' or not native.supports(x1.dtype):
    return False
  d = q * q * x1.shape[-1]
  if d > native.MAX_PATCH_DIM and metric is not None:
    return False
  return native.available()


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5, 6))
def _native_conv_kernel(x1, x2, metric, depth, q, padding, kind):
  return native.kernel(x1, x2, metric, depth, q, padding, kind == Kind.NTK)


@_native_conv_kernel.defjvp
def _native_conv_kernel_jvp(depth, q, padding, kind, primals, tangents):
  # Derivatives (and their primal) through the XLA path: the same function to float32
  # rounding, with the custom-JVP ReLU maps.
  return jax.jvp(lambda a, b, m: _xla_conv_kernel(a, b, m, depth, q, padding, kind, None),
                 primals, tangents)


# Calls per native kernel matrix (`native_kernel_matrix`): progress is reported per call.
_NATIVE_MATRIX_CHUNKS = 4


@functools.partial(jax.jit, static_argnames=('depth', 'q', 'padding', 'kind'))
def _native_rows(x1, cols, metric, first_row, depth, q, padding, kind):
  return native.kernel_from_columns(x1, cols, metric, depth, q, padding, kind == Kind.NTK,
                                    first_row)


def _mirror_upper(k) -> np.ndarray:
  """The symmetric matrix with `k`'s upper triangle, on the host.

  (Not `jnp.where(i <= j, k, k.T)` under jit: with jax 0.10.2 that program segfaults in XLA's
  CPU `copy_select_fusion` for a 1000 x 1000 float32 input; 200 and 500 run.)
  """
  k = np.asarray(k)
  return np.triu(k) + np.triu(k, 1).T


def native_kernel_matrix(x1, x2, metric, depth, q, padding, kind, progress=None,
                         across_processes=False):
  """Whole kernel matrix through the native custom call, or None where it does not apply.

  For callers that would otherwise cut the matrix into tiles (`tiling.kernel_matrix`): the
  native call needs no tiles (its memory is its operands and the output), so it runs in
  `_NATIVE_MATRIX_CHUNKS` row chunks, calling `progress(done, total)` after each. With
  `x2=None` the matrix is symmetric: each chunk computes only the 16-column blocks that reach
  its rows' diagonal, and the upper triangle is mirrored (about half the work). Returns a
  float32 host array, or None unless `_native_applies` (float32, CPU
  default backend, library available).

  The column images' operands (`native.columns`: patches times the metric and self Grams, or
  for the identity metric past `native.MAX_PATCH_DIM` the images themselves) are prepared once
  and shared by the chunks, which therefore also share one compiled program; in a symmetric
  matrix the call skips (zero-fills) the column blocks wholly left of a chunk row's diagonal.
  On a 2-core Xeon (1000 images 42x42, q = 3, depth 3, a metric; 2026-11-29, when each chunk
  still prepared its own columns) the symmetric 1000 x 1000 matrix took 1.95 s in 4 chunks
  against 2.9-3.0 s in ConvRFM's default 63-wide tiles, and 1000 x 1000 3.5 s against 4.35 s
  in 200 x 200 tiles. The symmetric matrix's diagonal pairs take the correlation 1 exactly:
  within 3e-7 of float64 where the tiled native and XLA float32 paths are 1e-4 off on the
  diagonal.

  `across_processes=True` in a multi-process run (after `jax.distributed.initialize()`;
  every process must then call this with the same arguments): the row chunks are shared out
  among the processes (each to the least loaded process, a symmetric chunk weighing its
  columns right of the diagonal), every process computes its own, and one all-reduce
  (`processes.sum_over_processes`) of the matrix, zero outside each process's rows, gives
  every process the whole matrix. Each entry has one nonzero term, so with up to
  `_NATIVE_MATRIX_CHUNKS` processes (the chunks of one process) the matrix is bitwise the one
  a single process computes; with more processes the chunks are smaller, which changes
  float32 rounding (the native call's values depend on its chunk of rows, by 1 ulp or so).
  """
  x2_ = x1 if x2 is None else x2
  if not _native_applies(x1, x2_, metric, q, padding):
    return None
  n1, n2 = x1.shape[0], x2_.shape[0]
  # Row chunks go to processes (one device each) by the block loops' least-loaded rule; the
  # matrix is filled in place, so only the assignment is used.
  work = processes.DeviceAccumulators(
      processes.one_device_per_process() if across_processes else jax.local_devices()[:1])
  chunk = -(-n1 // max(_NATIVE_MATRIX_CHUNKS, len(work.devices)))
  total = -(-n1 // chunk)
  x1p = _pad_batch(x1, chunk)
  cols = native.columns(x2_, metric, q, padding)
  k = np.zeros((total * chunk, n2), np.float32)
  for c in range(total):
    r0 = c * chunk
    if work.local(work.assign(n2 - r0 if x2 is None else n2)):
      first = jnp.asarray(r0 if x2 is None else -1, jnp.int32)
      rows = _native_rows(x1p[r0:r0 + chunk], cols, metric, first, depth=depth, q=q,
                          padding=padding, kind=kind)
      k[r0:r0 + chunk] = np.asarray(rows)[:, :n2]
    if progress is not None:
      progress(c + 1, total)
  k = np.asarray(processes.sum_over_processes(k, work.devices))   # k itself in one process
  k = k[:n1]
  return _mirror_upper(k) if x2 is None else k


# --------------------------------------------------------------------------------------------
# Learned metrics on many channels: patch features `F^T p`, formed once per kernel matrix.
# --------------------------------------------------------------------------------------------

# Images whose patches exist at a time while features are formed (16 images of 28 x 28
# positions with d = 576 take 29 MB).
_FEATURE_IMAGES = 16
# Bytes of features (the column chunk's and one row chunk's) that `metric_kernel_matrix`
# holds at a time.
FEATURE_BYTES = 1 << 31
# Row images per call in `metric_kernel_matrix`. (Each call lays the column features out in
# lanes; at 256 column images with d = 576 on a 2-core Xeon that took about 0.17 s of a
# 64-row call's 0.43 s and of a 256-row call's 1.2 s.)
_FEATURE_ROWS = 128


@jax.jit
def metric_factor(metric: jax.Array) -> jax.Array:
  """`F` `(d, d)` with `F F^T = M` for a symmetric PSD `M`: `U diag(sqrt(max(lambda, 0)))`.

  Negative eigenvalues (rounding noise of a PSD metric) are clipped to zero, as in
  `jconvrfm.sqrt_psd`. Traceable; unchecked: callers validate `M`. `metric_factor_reduced`
  drops the columns that carry nothing.
  """
  lam, u = jnp.linalg.eigh((metric + metric.T) / 2)
  return u * jnp.sqrt(jnp.maximum(lam, 0))


# The reduced factor's column count is rounded up to a multiple of this (zero columns), so
# that a few compiled programs serve every rank; a factor that would keep nearly all of `d`
# stays at `d` and shares the full-rank programs.
_FACTOR_COLUMNS = 32


def metric_factor_reduced(metric) -> jax.Array:
  """`F` `(d, r)`, `F F^T = M` to `M`'s working precision, with `r` its numerical rank.

  Eigen-decomposed in float64 on the host; the eigenvalues at or below `eps lambda_max`
  (`eps` of `M`'s dtype) are dropped. Those are below what the stored `M` determines: a
  perturbation of each entry by its rounding error, `eps |M|`, moves eigenvalues by up to
  `eps ||M||_F >= eps lambda_max`. So `|p^T (F F^T - M) p'| <= eps lambda_max |p| |p'|`,
  the rounding of `M` itself. Learned metrics are far from full rank: ConvRFM's
  `M = S^2` squares the spread of the AGOP's spectrum, and in the Deep ConvRFM protocol on
  CIFAR-10 (64 feature maps, d = 576) the third round's metrics keep 88 and 252 columns.
  Every cost of the features paths (the features, layer 1's Grams, the AGOP's contractions and
  outer sums) scales with `r`. `r` is rounded up to a multiple of 32 with zero columns, and
  capped at `d`. Needs a concrete `M` (its rank sets a shape).

  References:
    Golub and Van Loan, Matrix Computations (4th ed.), sections 2.4 and 8.1 (numerical rank;
    Weyl's bound on eigenvalue perturbations).
  """
  m = np.asarray(metric)
  dtype = m.dtype
  m = m.astype(np.float64)
  lam, u = np.linalg.eigh((m + m.T) / 2)
  d = lam.shape[0]
  tol = np.finfo(dtype).eps * max(float(lam[-1]), 0.0)
  keep = int(np.sum(lam > tol))
  r = min(d, -(-max(keep, 1) // _FACTOR_COLUMNS) * _FACTOR_COLUMNS)
  lam, u = lam[d - r:], u[:, d - r:]           # ascending: the top r, the first r - keep zeroed
  root = np.sqrt(np.where(np.arange(r) >= r - keep, np.maximum(lam, 0), 0))
  return jnp.asarray(u * root, dtype)


def _chunk_features(xc, factor, q, padding):
  """`(n, H', W', r)` features `F^T p` of a few images; `factor=None`: the patches."""
  p = patches_lib._patches(xc, q, 1, padding)  # pylint: disable=protected-access
  return p if factor is None else p @ factor


def _metric_features(x, factor, q, padding, reduce=None):
  """`(n, H', W', r)` features `F^T p` of every patch, `_FEATURE_IMAGES` images at a time.

  With `F F^T = M`, `<F^T p, F^T p'> = p^T M p'`. `reduce` (optional) maps each chunk's
  features before they are kept (e.g. to their squared norms).
  """
  n = x.shape[0]
  chunk = min(n, _FEATURE_IMAGES)
  xp = _pad_batch(x, chunk)

  def one(xc):
    t = _chunk_features(xc, factor, q, padding)
    return t if reduce is None else reduce(t)
  out = jax.lax.map(one, xp.reshape((-1, chunk) + x.shape[1:]))
  return out.reshape((-1,) + out.shape[2:])[:n]


_metric_features_jit = jax.jit(_metric_features, static_argnames=('q', 'padding', 'reduce'))


@functools.partial(jax.jit, static_argnames=('q', 'padding'))
def metric_features_position_major(x, factor, q, padding):
  """Features `(H', W', n, r)` (positions leading) and their squared norms `(H', W', n)`.

  `factor=None`: the patches themselves (the identity metric). Written chunk by chunk
  (`_FEATURE_IMAGES` images) into one buffer, so that the transposed layout costs no second
  copy of all features.
  """
  n = x.shape[0]
  chunk = min(n, _FEATURE_IMAGES)
  xp = _pad_batch(x, chunk)
  h, w = patches_lib.output_shape(x.shape[1], x.shape[2], q, 1, padding)
  r = q * q * x.shape[-1] if factor is None else factor.shape[1]

  def body(i, bufs):
    t = _chunk_features(jax.lax.dynamic_slice_in_dim(xp, i * chunk, chunk), factor, q, padding)
    t_sq = jnp.sum(t * t, axis=-1)
    return (jax.lax.dynamic_update_slice_in_dim(bufs[0], jnp.transpose(t, (1, 2, 0, 3)),
                                                i * chunk, axis=2),
            jax.lax.dynamic_update_slice_in_dim(bufs[1], jnp.transpose(t_sq, (1, 2, 0)),
                                                i * chunk, axis=2))

  init = (jnp.zeros((h, w, xp.shape[0], r), x.dtype), jnp.zeros((h, w, xp.shape[0]), x.dtype))
  t, t_sq = jax.lax.fori_loop(0, xp.shape[0] // chunk, body, init)
  return t[:, :, :n], t_sq[:, :, :n]


@functools.partial(jax.jit, static_argnames=('depth', 'q', 'padding', 'channels', 'kind'))
def _xla_feature_kernel(t1, t2, depth, q, padding, channels, kind):
  """`(n1, n2)` kernel from features `(n, H', W', r)` (XLA tiles, as `_xla_conv_kernel`)."""
  n1, n2 = t1.shape[0], t2.shape[0]
  budget = (_TILE_ELEMENTS if jax.default_backend() == 'cpu' else
            _TILE_ELEMENTS_ACCELERATOR)
  b1, b2 = tile_shape(n1, n2, t1.shape[1] * t1.shape[2], budget)
  b1, b2 = min(b1, n1), min(b2, n2)
  t1p, t2p = _pad_batch(t1, b1), _pad_batch(t2, b2)
  f1 = _split_features(t1p, jnp.sum(t1p * t1p, axis=-1), b1, side=1)
  f2 = _split_features(t2p, jnp.sum(t2p * t2p, axis=-1), b2, side=2)
  block = functools.partial(_fused_block_from_features, depth=depth, q=q, padding=padding,
                            channels=channels, kind=kind)
  return _tile_loop(block, f1, f2, n1, n2, b1, b2)


@functools.partial(jax.jit, static_argnames=('depth', 'q', 'padding', 'channels', 'kind'))
def _native_feature_rows(t1, cols, first_row, depth, q, padding, channels, kind):
  return native.kernel_from_feature_columns(t1, cols, depth, q, padding, kind == Kind.NTK,
                                            channels, first_row)


def metric_kernel_matrix(x1, x2, metric, depth, q, padding, kind, progress=None,
                         feature_bytes: int = FEATURE_BYTES) -> np.ndarray:
  """Whole kernel matrix with a learned metric of large patch dimension, on the host.

  The tiled paths form every tile's patches and `M p` again (`d x d` products per patch, for
  each tile an image meets): at d = q^2 C = 576 (3 x 3 patches of 64 feature maps, a Deep
  ConvRFM layer) that work is about 18 times the kernel's own in 63-image tiles. Here each
  image's patch features `F^T p` (`F F^T = M`, `metric_factor_reduced`: `r` columns, `M`'s
  numerical rank, so layer 1 costs `r` rather than `d` per pair) are formed once per column
  chunk: the column images' once, the row images' once per column chunk left of them. Layer
  1's covariance is then the features' inner product, and the kernel is the identity-metric
  kernel of the features with a 1 x 1 first window. Features take q^2 times the images'
  memory (times r / C); at most `feature_bytes` of them are held at a time (the columns in
  chunks of as many images as fit beside one `_FEATURE_ROWS`-image row chunk).

  float32 on a CPU with the native library: the native pixel call on the features
  (`native.kernel_from_feature_columns`; in a symmetric matrix only the 16-column blocks that
  reach a row's diagonal, whose pairs take correlation 1 exactly); otherwise XLA tiles
  (`_xla_feature_kernel`). `x2=None`: symmetric, only column chunks at or right of each row
  chunk are computed and the upper triangle mirrored. `progress(done, total)` after each call.
  Returns an `(n1, n2)` array of the images' dtype.
  """
  x2_ = x1 if x2 is None else x2
  n1, n2 = x1.shape[0], x2_.shape[0]
  out_h, out_w = patches_lib.output_shape(x1.shape[1], x1.shape[2], q, 1, padding)
  factor = metric_factor_reduced(metric)
  per_image = out_h * out_w * factor.shape[1] * x1.dtype.itemsize
  rows = _FEATURE_ROWS
  # Column chunks of equal size (one compiled program), whole 16-image lane blocks.
  most = max(native.LANES, (feature_bytes // per_image - rows) // native.LANES * native.LANES)
  chunks = -(-n2 // most)
  size = -(-(-(-n2 // chunks)) // native.LANES) * native.LANES
  use_native = (jax.default_backend() == 'cpu' and native.supports(x1.dtype) and
                native.available())
  static = dict(depth=depth, q=q, padding=padding, channels=x1.shape[-1], kind=kind)
  features = functools.partial(_metric_features_jit, factor=factor, q=q,
                               padding=padding)
  # Per column chunk [c0, c1): row chunks of the row images (all of them; in a symmetric
  # matrix those above the chunk, the last one cut at c0), then in a symmetric matrix the
  # chunk's own images as rows, whose features are the columns'.
  plan = []
  for c0 in range(0, n2, size):
    c1 = min(n2, c0 + size)
    end = n1 if x2 is not None else c0
    plan.append((c0, c1, [(r0, min(end, r0 + rows), False) for r0 in range(0, end, rows)] +
                 ([(r0, min(c1, r0 + rows), True) for r0 in range(c0, c1, rows)]
                  if x2 is None else [])))
  total = sum(len(r) for _, _, r in plan)
  k = np.zeros((n1, n2), x1.dtype)
  done = 0
  for c0, c1, row_chunks in plan:
    t2 = features(_pad_batch(x2_[c0:c1], size))
    cols = native.feature_columns(t2) if use_native else t2
    for r0, r1, diagonal in row_chunks:
      t1 = (_pad_batch(t2[r0 - c0:r1 - c0], rows) if diagonal else
            features(_pad_batch(x1[r0:r1], rows)))
      if use_native:
        first = jnp.asarray(r0 - c0 if diagonal else -1, jnp.int32)
        block = _native_feature_rows(t1, cols, first, **static)
      else:
        block = _xla_feature_kernel(t1, t2, **static)
      k[r0:r1, c0:c1] = np.asarray(block)[:r1 - r0, :c1 - c0]
      done += 1
      if progress is not None:
        progress(done, total)
  return _mirror_upper(k) if x2 is None else k


def whole_kernel_matrix(x1, x2, metric, depth, q, padding, kind, progress=None):
  """A kernel matrix by a path that needs no tiles, or None where none applies.

  The native custom call (`native_kernel_matrix`), else for a learned metric of patch
  dimension above 64 the patch features (`metric_kernel_matrix`) in a single process on a CPU
  or a single accelerator. Callers tile (`tiling.kernel_matrix`) where this returns None,
  which spreads the tiles over several accelerators or hosts. In a multi-process run every
  process must call this with the same arguments: the native path shares its row chunks out
  among the processes (`native_kernel_matrix(across_processes=True)`).
  """
  k = native_kernel_matrix(x1, x2, metric, depth, q, padding, kind, progress,
                           across_processes=jax.process_count() > 1)
  single = jax.process_count() == 1 and (jax.default_backend() == 'cpu' or
                                         jax.local_device_count() == 1)
  if (k is None and single and metric is not None and
      metric.shape[0] > _MAX_PRECOMPUTED_PATCH_DIM):
    k = metric_kernel_matrix(x1, x2, metric, depth, q, padding, kind, progress)
  return k


@functools.partial(jax.jit,
                   static_argnames=('depth', 'q', 'padding', 'kind', 'tile'))
def fused_conv_kernel(x1, x2, metric, depth, q, padding, kind, tile=None):
  """Unchecked fused kernel `(n1, n2)`.

  float32 on a CPU: the native custom call (`native.py`) when it is available and `tile` is
  None (through `jax.lax.platform_dependent`, so the program still lowers to the XLA path on
  other platforms; derivatives go through the XLA path). Otherwise the XLA path, computed in
  `(b1, b2)` tiles (`lax.map` loops): `tile=None` picks `tile_shape(n1, n2, H' W')`;
  `tile=(n1, n2)` computes in one piece. With a metric, every image's patches, `M p` and self
  Grams are computed once per call rather than once per tile, unless the patch dimension
  exceeds 64 and the patches would take more than 1 GiB (`_precomputes_patches`).
  """
  if tile is None and _native_applies(x1, x2, metric, q, padding):
    return jax.lax.platform_dependent(
        x1, x2, metric,
        cpu=lambda a, b, m: _native_conv_kernel(a, b, m, depth, q, padding, kind),
        default=lambda a, b, m: _xla_conv_kernel(a, b, m, depth, q, padding, kind, None))
  return _xla_conv_kernel(x1, x2, metric, depth, q, padding, kind, tile)


def _xla_conv_kernel(x1, x2, metric, depth, q, padding, kind, tile):
  """The XLA path of `fused_conv_kernel` (traceable; see there)."""
  n1, n2 = x1.shape[0], x2.shape[0]
  out_h, out_w = patches_lib.output_shape(x1.shape[1], x1.shape[2], q, 1, padding)
  if tile is None:
    budget = (_TILE_ELEMENTS if jax.default_backend() == 'cpu' else
              _TILE_ELEMENTS_ACCELERATOR)
    tile = tile_shape(n1, n2, out_h * out_w, budget)
  b1, b2 = min(tile[0], n1), min(tile[1], n2)
  channels = x1.shape[-1]
  x1p = _pad_batch(x1, b1)
  x2p = _pad_batch(x2, b2)
  if metric is not None and _precomputes_patches(x1p.shape[0], x2p.shape[0], out_h * out_w,
                                                 metric.shape[0], x1.dtype.itemsize):
    f1 = _patch_features(x1p, metric, q, padding, b1, side=1)
    f2 = _patch_features(x2p, metric, q, padding, b2, side=2)
    block = functools.partial(_fused_block_from_features, depth=depth, q=q, padding=padding,
                              channels=channels, kind=kind)
  else:
    f1 = x1p.reshape((-1, b1) + x1.shape[1:])
    f2 = x2p.reshape((-1, b2) + x2.shape[1:])
    block = lambda a, b: _fused_block(a, b, metric, depth, q, padding, kind)
  return _tile_loop(block, f1, f2, n1, n2, b1, b2)


def _tile_loop(block, f1, f2, n1, n2, b1, b2):
  """`(n1, n2)` from `block(f1[i], f2[j]) -> (b1, b2)` over the leading block axes."""
  if (b1, b2) == (n1, n2):
    return block(jax.tree.map(lambda a: a[0], f1), jax.tree.map(lambda a: a[0], f2))

  def row(fa):
    cols = jax.lax.map(lambda fb: block(fa, fb), f2)
    return jnp.transpose(cols, (1, 0, 2)).reshape(b1, -1)  # (b1, n2 padded)

  out = jax.lax.map(row, f1).reshape(-1, _num_blocks(f2) * b2)
  return out[:n1, :n2]
