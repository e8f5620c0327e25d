"""Measures of the Convolutional Neural Feature Ansatz: CNFM, correlations, PSD powers.

The CNFA states that a trained convolutional layer's filter covariance `W W^T` (the CNFM) is
proportional to a power of the patch AGOP `G` of the network at that layer (power 1 in the
paper, 1/2 in later work). The agreement is measured by the (Pearson) correlation between the
entries of the two d x d matrices.

References:
  D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
  convolutional neural networks. arXiv:2309.00570, 2023.
"""

import functools
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from jconvrfm._src import checks

_HIGHEST = jax.lax.Precision.HIGHEST


def _check_kernel(kernel, name: str = 'kernel') -> jax.Array:
  """A Flax conv kernel `(q, q, c, k)` (or filters `(d, k)`), returned as `(d, k)`."""
  kernel = checks.check_array(kernel, name, (2, 4), layout='(q, q, c, k) Flax HWIO or (d, k)')
  if kernel.ndim == 4 and kernel.shape[0] != kernel.shape[1]:
    raise ValueError(
        f'`{name}` must be a square q x q kernel of shape (q, q, c, k), got {kernel.shape}.')
  return kernel.reshape(-1, kernel.shape[-1])


def cnfm(kernel: jax.Array) -> jax.Array:
  """Convolutional neural feature matrix (filter covariance) `W W^T`, uncentered.

  Args:
    kernel: a conv layer's weights, shape `(q, q, c, k)` in Flax (HWIO) layout, or its filters
      already flattened to `(d, k)` with `d = q*q*c` in Flax kernel order (feature index
      `(u*q + v)*c + ch`). Any real floating dtype; must be finite.

  Returns:
    `(d, d)` matrix `W W^T` where `W = kernel.reshape(d, k)`, dtype of `kernel`, computed at
    the highest matmul precision.

  Example:
    >>> import jax.numpy as jnp
    >>> from jconvrfm import cnfm
    >>> kernel = jnp.ones((3, 3, 1, 4), dtype=jnp.float32)
    >>> cnfm(kernel).shape
    (9, 9)
    >>> float(cnfm(kernel)[0, 0])
    4.0

  References:
    D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
    convolutional neural networks. arXiv:2309.00570, 2023 (the CNFM, Section 2).
  """
  w = _check_kernel(kernel)
  return jnp.matmul(w, w.T, precision=_HIGHEST)


@functools.partial(jax.jit, static_argnames=('centered',))
def _correlation(a: jax.Array, b: jax.Array, centered: bool) -> jax.Array:
  a = a.ravel()
  b = b.ravel()
  if centered:
    a = a - jnp.mean(a)
    b = b - jnp.mean(b)
  return jnp.dot(a, b, precision=_HIGHEST) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))


def correlation(a: jax.Array, b: jax.Array, centered: bool = True) -> jax.Array:
  """Correlation between the entries of two equally shaped matrices (e.g. CNFM vs AGOP).

  `centered=True` (the paper's headline measure): subtract each matrix's scalar mean over all
  its entries, then take the cosine of the flattened matrices (Pearson correlation of the
  entries). `centered=False`: the plain cosine `<a, b>_F / (||a||_F ||b||_F)`.

  Args:
    a: array of any shape, usually `(d, d)`; real floating dtype, finite.
    b: array of the same shape as `a`.
    centered: Pearson (True) or uncentered cosine (False).

  Returns:
    Scalar in [-1, 1], dtype `result_type(a, b)`.

  Raises:
    ValueError: shape mismatch, empty input, NaN/Inf, or a matrix with zero norm after
      centring (a constant matrix when `centered`, an all-zero one otherwise), for which the
      correlation is undefined. Under `jit`/`vmap`/`grad` the value checks cannot run and such
      input gives NaN.

  Example:
    >>> import jax.numpy as jnp
    >>> from jconvrfm import correlation
    >>> a = jnp.array([[2.0, 1.0], [1.0, 2.0]])
    >>> round(float(correlation(a, 3 * a + 1)), 6)
    1.0
    >>> round(float(correlation(a, -a, centered=False)), 6)
    -1.0

  References:
    D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
    convolutional neural networks. arXiv:2309.00570, 2023.
  """
  a = checks.check_array(a, 'a')
  b = checks.check_array(b, 'b')
  if a.shape != b.shape:
    raise ValueError(
        f'`a` and `b` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.')
  if a.size == 0:
    raise ValueError('`a` and `b` must not be empty.')
  for name, m in (('a', a), ('b', b)):
    if checks.is_concrete(m):
      v = m - jnp.mean(m) if centered else m
      if not bool(jnp.any(v != 0)):
        what = 'constant (zero variance)' if centered else 'all zero'
        raise ValueError(f'`{name}` is {what}, so its correlation is undefined'
                         f'{"; use centered=False" if centered else ""}.')
  dtype = jnp.result_type(a, b)
  return _correlation(a.astype(dtype), b.astype(dtype), bool(centered))


@jax.jit
def _matrix_power_psd(m: jax.Array, p: jax.Array) -> jax.Array:
  sym = (m + m.T) / 2
  eigvals, eigvecs = jnp.linalg.eigh(sym)
  clipped = jnp.maximum(eigvals, 0)
  # Zero eigenvalues stay zero (0**p with p > 0); the `where` keeps gradients finite away from 0.
  powered = jnp.where(clipped > 0, jnp.power(jnp.where(clipped > 0, clipped, 1), p), 0)
  return jnp.matmul(eigvecs * powered.astype(m.dtype), eigvecs.T, precision=_HIGHEST)


def _check_square(m, name: str) -> jax.Array:
  m = checks.check_array(m, name, 2, layout='(d, d)')
  if m.shape[0] != m.shape[1]:
    raise ValueError(f'`{name}` must be a square (d, d) matrix, got shape {tuple(m.shape)}.')
  if checks.is_concrete(m):
    scale = float(jnp.max(jnp.abs(m)))
    asym = float(jnp.max(jnp.abs(m - m.T)))
    tol = 100 * float(jnp.finfo(m.dtype).eps) * max(scale, 1e-30) * m.shape[0]
    if asym > max(tol, 1e-6 * scale):
      raise ValueError(f'`{name}` must be symmetric; max |m - m^T| = {asym:.3g} '
                       f'(max |m| = {scale:.3g}).')
  return m


def matrix_power_psd(m: jax.Array, p: Union[float, jax.Array]) -> jax.Array:
  """`m^p` of a symmetric positive semi-definite matrix, with negative eigenvalues clipped.

  Computes `U diag(max(lambda, 0)^p) U^T` from the eigendecomposition of `(m + m^T) / 2`.
  Negative eigenvalues (rounding noise of an AGOP or of a float32 Gram matrix) are clipped to
  zero *by design*: the result is always PSD. Eigenvalues that are exactly zero (after clipping)
  stay zero. Asymmetry beyond rounding is rejected, not symmetrised away.

  Args:
    m: `(d, d)` symmetric matrix, real floating dtype (kept), finite.
    p: the power, a float > 0 (e.g. 0.5 for the square root, 1 for the PSD projection of `m`).

  Returns:
    `(d, d)` PSD matrix `m^p`, dtype of `m`.

  Raises:
    ValueError: non-square or asymmetric `m`, NaN/Inf, or `p <= 0`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jconvrfm import matrix_power_psd
    >>> m = jnp.diag(jnp.array([4.0, 9.0, -1e-7]))
    >>> matrix_power_psd(m, 0.5).diagonal().round(6).tolist()
    [2.0, 3.0, 0.0]

  References:
    D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
    convolutional neural networks. arXiv:2309.00570, 2023 (the square root of the AGOP in
    ConvRFM).
  """
  m = _check_square(m, 'm')
  if isinstance(p, (int, float, np.integer, np.floating)) and not isinstance(p, bool):
    if not np.isfinite(p) or p <= 0:
      raise ValueError(f'`p` must be a finite power > 0, got {p!r}.')
  elif not isinstance(p, (jax.Array, np.ndarray)) or np.ndim(p) != 0:
    raise TypeError(f'`p` must be a positive scalar, got {p!r}.')
  elif checks.is_concrete(p) and not bool(p > 0):
    raise ValueError(f'`p` must be a finite power > 0, got {p!r}.')
  return _matrix_power_psd(m, jnp.asarray(p, dtype=m.dtype))


def sqrt_psd(m: jax.Array) -> jax.Array:
  """Principal square root of a symmetric PSD matrix; `matrix_power_psd(m, 0.5)`.

  Negative eigenvalues of `(m + m^T) / 2` are clipped to zero before the root (documented, by
  design; see `matrix_power_psd`).

  Args:
    m: `(d, d)` symmetric matrix, real floating dtype (kept), finite.

  Returns:
    `(d, d)` PSD matrix `S` with `S @ S = m` when `m` is PSD, dtype of `m`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jconvrfm import sqrt_psd
    >>> s = sqrt_psd(jnp.array([[2.0, 1.0], [1.0, 2.0]]))
    >>> (s @ s).round(5).tolist()
    [[2.0, 1.0], [1.0, 2.0]]
  """
  return matrix_power_psd(m, 0.5)
