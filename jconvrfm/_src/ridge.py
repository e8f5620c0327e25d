"""Kernel ridge regression solves by Cholesky factorisation, with reported jitter.

`ridge_solve(k, y, ridge)` returns `alpha = (K + (ridge + jitter) I)^{-1} Y`. The factorisation is
a Cholesky of `K + ridge I`; when it fails (a non-finite factor, as happens for a numerically
singular `K` with a tiny ridge in float32) a jitter `eps(dtype) * mean(diag K) * 10^t` is added
for `t = 0, 1, ...` up to `max_jitter_tries` times, and the jitter actually used is returned in
`RidgeSolution.jitter` so that callers can log it. If every try fails a `ValueError` says so.

Solving for a grid of ridges (`ridge_path`) factorises once per ridge: for the n <= a few
thousand used here a Cholesky is O(n^3 / 3) and costs far less than building `K`, and, unlike an
eigendecomposition reused across ridges, it keeps the float32 path exactly a triangular solve of
the regularised system (no cancellation in `U diag(1/(e + ridge)) U^T`).

References:
  D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
  convolutional neural networks. arXiv:2309.00570, 2023 (ridge step of ConvRFM).
"""

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from jconvrfm._src import checks


class RidgeSolution(NamedTuple):
  """Coefficients of a kernel ridge regression.

  Attributes:
    alpha: `(n, k)` coefficients, dtype of `K`.
    ridge: the requested ridge `lambda` (a Python float).
    jitter: the extra diagonal added beyond `ridge` so that the Cholesky succeeded (0.0 if none).
  """
  alpha: jax.Array
  ridge: float
  jitter: float


@jax.jit
def _cholesky_solve(k: jax.Array, y: jax.Array, shift: jax.Array):
  """Returns `(alpha, ok)` for `(K + shift I) alpha = y` via Cholesky; ok False on failure."""
  n = k.shape[0]
  a = k + shift * jnp.eye(n, dtype=k.dtype)
  chol = jnp.linalg.cholesky(a)
  ok = jnp.all(jnp.isfinite(chol))
  alpha = jsl.cho_solve((chol, True), y)
  ok = ok & jnp.all(jnp.isfinite(alpha))
  return alpha, ok


def _check_system(k, y):
  k = checks.check_array(k, 'k_train', 2, layout='(n, n)')
  if k.shape[0] != k.shape[1]:
    raise ValueError(f'`k_train` must be square (n, n), got shape {tuple(k.shape)}.')
  y = checks.check_array(y, 'y', (1, 2), layout='(n,) or (n, k)')
  if y.shape[0] != k.shape[0]:
    raise ValueError(
        f'`y` must have {k.shape[0]} rows to match `k_train` {tuple(k.shape)}, '
        f'got shape {tuple(y.shape)}.')
  return k, y.astype(k.dtype)


def ridge_solve(k_train: jax.Array,
                y: jax.Array,
                ridge: float,
                *,
                max_jitter_tries: int = 8) -> RidgeSolution:
  """Solves `(K + ridge I) alpha = Y` by Cholesky, escalating a jitter if needed.

  Args:
    k_train: `(n, n)` symmetric positive semi-definite kernel matrix, float32 or float64.
    y: `(n, k)` (or `(n,)`) targets, cast to the dtype of `k_train`.
    ridge: `lambda >= 0`.
    max_jitter_tries: how many escalating jitters `eps * mean(diag K) * 10^t`, t = 0, 1, ...,
      to try after the plain factorisation fails.

  Returns:
    A `RidgeSolution` with `alpha` of the shape of `y` and the dtype of `k_train`.

  Raises:
    ValueError: bad shapes, non-finite input, a negative ridge, or no jitter made the matrix
      factorisable (K is not PSD, or is too ill-conditioned for its dtype).

  >>> import jax.numpy as jnp
  >>> k = jnp.array([[2., 1.], [1., 2.]])
  >>> sol = ridge_solve(k, jnp.array([[1.], [0.]]), 0.0)
  >>> [round(float(a), 4) for a in sol.alpha[:, 0]], sol.jitter
  ([0.6667, -0.3333], 0.0)
  """
  k, y = _check_system(k_train, y)
  ridge = float(ridge)
  if not np.isfinite(ridge) or ridge < 0:
    raise ValueError(f'`ridge` must be a finite number >= 0, got {ridge}.')
  checks.check_positive_int(max_jitter_tries, 'max_jitter_tries', minimum=0)
  eps = float(jnp.finfo(k.dtype).eps)
  scale = float(jnp.mean(jnp.abs(jnp.diagonal(k))))
  scale = scale if scale > 0 else 1.0
  jitters = [0.0] + [eps * scale * 10.0**t for t in range(max_jitter_tries)]
  for jitter in jitters:
    alpha, ok = _cholesky_solve(k, y, jnp.asarray(ridge + jitter, k.dtype))
    if bool(ok):
      return RidgeSolution(alpha=alpha, ridge=ridge, jitter=jitter)
  raise ValueError(
      f'Cholesky of `k_train + {ridge:g} I` ({k.shape[0]}x{k.shape[0]}, {k.dtype}) failed even '
      f'with jitter up to {jitters[-1]:.3g}: the kernel matrix is not positive semi-definite or '
      f'is too ill-conditioned for {k.dtype}; use float64 or a larger ridge.')


def ridge_path(k_train: jax.Array,
               y: jax.Array,
               ridges: Sequence[float],
               *,
               max_jitter_tries: int = 8) -> list:
  """`ridge_solve` for each ridge of a grid (one Cholesky per ridge); list of `RidgeSolution`.

  >>> import jax.numpy as jnp
  >>> sols = ridge_path(jnp.eye(3), jnp.ones((3, 2)), [0.0, 1.0])
  >>> [round(float(s.alpha[0, 0]), 4) for s in sols]
  [1.0, 0.5]
  """
  if len(ridges) == 0:
    raise ValueError('`ridges` must hold at least one ridge value.')
  return [ridge_solve(k_train, y, r, max_jitter_tries=max_jitter_tries) for r in ridges]
