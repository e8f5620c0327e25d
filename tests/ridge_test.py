"""Tests for jconvrfm._src.ridge (Cholesky ridge solves with reported jitter)."""

import doctest

import jax.numpy as jnp
import numpy as np
import pytest

from jconvrfm._src import ridge
from tests import tolerances


def _psd(n, rank, seed, dtype=np.float64):
  rng = np.random.default_rng(seed)
  f = rng.normal(size=(n, rank))
  k = f @ f.T
  return (k / np.max(k)).astype(dtype)


@pytest.mark.parametrize('lam', [1e-3, 1e-1, 1.0])
def test_matches_dense_solve_float64(lam):
  k = _psd(30, 40, 0)
  y = np.random.default_rng(1).normal(size=(30, 4))
  sol = ridge.ridge_solve(jnp.asarray(k), jnp.asarray(y), lam)
  want = np.linalg.solve(k + lam * np.eye(30), y)
  assert sol.jitter == 0.0 and sol.ridge == lam
  assert sol.alpha.dtype == jnp.float64
  tolerances.assert_rel_fro(sol.alpha, want, 1e-10, 'alpha')


def test_float32_keeps_dtype_and_is_close_to_float64():
  k = _psd(40, 60, 2)
  y = np.eye(4)[np.arange(40) % 4]
  sol = ridge.ridge_solve(jnp.asarray(k, jnp.float32), jnp.asarray(y, jnp.float32), 1e-2)
  assert sol.alpha.dtype == jnp.float32
  want = np.linalg.solve(k + 1e-2 * np.eye(40), y)
  tolerances.assert_rel_fro(sol.alpha, want, 1e-3, 'alpha float32')


def test_singular_matrix_escalates_and_reports_jitter():
  # Rank 3 in 20 dimensions with ridge 0: the plain Cholesky fails; the jitter must be reported
  # and alpha must solve the jittered system exactly.
  k = _psd(20, 3, 3)
  y = np.random.default_rng(4).normal(size=(20, 2))
  sol = ridge.ridge_solve(jnp.asarray(k), jnp.asarray(y), 0.0)
  assert sol.jitter > 0.0
  # The jittered system is ill-conditioned, so check the backward error (what a Cholesky
  # guarantees) rather than the forward error.
  a = k + sol.jitter * np.eye(20)
  alpha = np.asarray(sol.alpha)
  backward = np.linalg.norm(a @ alpha - y) / (
      np.linalg.norm(a) * np.linalg.norm(alpha) + np.linalg.norm(y))
  assert backward < 1e-12, backward


def test_indefinite_matrix_raises():
  k = np.diag([1.0, 1.0, -1.0])
  with pytest.raises(ValueError, match='not positive semi-definite'):
    ridge.ridge_solve(jnp.asarray(k), jnp.ones((3, 1)), 0.0, max_jitter_tries=3)


@pytest.mark.parametrize('k,y,lam,match', [
    (np.ones((3, 4)), np.ones((3, 1)), 0.1, 'square'),
    (np.eye(3), np.ones((4, 1)), 0.1, 'rows'),
    (np.eye(3), np.ones((3, 1)), -1.0, 'ridge'),
    (np.array([[1.0, np.nan], [np.nan, 1.0]]), np.ones((2, 1)), 0.1, 'NaN'),
])
def test_bad_input(k, y, lam, match):
  with pytest.raises(ValueError, match=match):
    ridge.ridge_solve(jnp.asarray(k), jnp.asarray(y), lam)


def test_path_one_solution_per_ridge():
  k = _psd(10, 12, 5)
  y = np.ones((10, 1))
  sols = ridge.ridge_path(jnp.asarray(k), jnp.asarray(y), [1e-2, 1.0])
  for s, lam in zip(sols, [1e-2, 1.0]):
    tolerances.assert_rel_fro(s.alpha, np.linalg.solve(k + lam * np.eye(10), y), 1e-10)
  with pytest.raises(ValueError, match='ridges'):
    ridge.ridge_path(jnp.asarray(k), jnp.asarray(y), [])


def test_docstring_examples():
  failures, _ = doctest.testmod(ridge, optionflags=doctest.ELLIPSIS)
  assert failures == 0
