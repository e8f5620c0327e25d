"""Tolerance helpers shared by the tests."""

import numpy as np


def rel_fro(a, b):
  """Relative Frobenius error ||a - b|| / ||b|| computed in float64 on the host."""
  a = np.asarray(a, dtype=np.float64)
  b = np.asarray(b, dtype=np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def assert_rel_fro(a, b, tol, what=''):
  err = rel_fro(a, b)
  assert err <= tol, f'{what}: relative Frobenius error {err:.3e} > {tol:.1e}'
