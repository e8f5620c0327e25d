"""Tests for the shared argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jconvrfm._src import checks


def test_padding_normalisation_and_error():
  assert checks.canonical_padding('same') is checks.Padding.SAME
  assert checks.canonical_padding(checks.Padding.CIRCULAR) is checks.Padding.CIRCULAR
  with pytest.raises(ValueError, match='`padding` must be one of'):
    checks.canonical_padding('reflect')


def test_check_array_errors_name_the_argument():
  with pytest.raises(ValueError, match='`x` must have rank 4'):
    checks.check_nhwc(np.zeros((2, 3, 4)), 'x')
  with pytest.raises(ValueError, match='`x` must not be empty'):
    checks.check_nhwc(np.zeros((0, 3, 3, 1)), 'x')
  bad = np.ones((2, 3, 3, 1))
  bad[1, 0, 0, 0] = np.nan
  bad[0, 2, 1, 0] = np.inf
  with pytest.raises(ValueError, match='`x` contains 2 NaN or Inf'):
    checks.check_nhwc(bad, 'x')
  with pytest.raises(TypeError, match='`x` must have a real floating dtype'):
    checks.check_array(np.ones(3, dtype=np.complex64), 'x')


def test_integer_input_converted_and_float_dtype_kept():
  assert checks.check_array(np.ones(3, dtype=np.int32), 'x').dtype == jnp.result_type(float)
  assert checks.check_array(np.ones(3, dtype=np.float32), 'x').dtype == jnp.float32


def test_symmetric_psd_checks():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(5, 3))
  checks.check_symmetric_psd(a @ a.T, 'metric', size=5)  # rank 3: PSD, accepted
  with pytest.raises(ValueError, match='shape \\(4, 4\\)'):
    checks.check_symmetric_psd(a @ a.T, 'metric', size=4)
  with pytest.raises(ValueError, match='must be symmetric'):
    checks.check_symmetric_psd(a @ a.T + np.triu(np.ones((5, 5)), 1), 'metric')
  with pytest.raises(ValueError, match='positive semi-definite'):
    checks.check_symmetric_psd(np.diag([1.0, -0.5, 2.0]), 'metric')


def test_value_checks_work_on_arrays_closed_over_inside_jit():
  # A concrete array captured by a jitted function stays checkable (host-side numpy), while
  # traced arguments only get shape/dtype checks.
  m = jnp.eye(3) * 2.0
  bad = jnp.eye(3).at[0, 1].set(jnp.nan)

  @jax.jit
  def f(x):
    checks.check_symmetric_psd(m, 'metric', size=3)
    checks.check_finite(x, 'x')  # tracer: skipped
    return x @ m

  np.testing.assert_allclose(f(jnp.ones(3)), 2.0 * np.ones(3))

  @jax.jit
  def g(x):
    checks.check_symmetric_psd(bad, 'metric')
    return x

  with pytest.raises(ValueError, match='`metric` contains 1 NaN'):
    g(jnp.ones(3))


def test_is_identity_is_exact():
  assert checks.is_identity(jnp.eye(4))
  assert not checks.is_identity(jnp.eye(4).at[1, 2].set(1e-30))
  assert not checks.is_identity(2 * jnp.eye(4))
