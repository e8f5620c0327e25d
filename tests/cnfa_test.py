"""Tests for the CNFA measures against numpy/scipy float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.stats

import jconvrfm
from tests import tolerances


def _random_psd(rng, d, rank=None):
  a = rng.normal(size=(d, rank or d))
  return a @ a.T


def test_cnfm_matches_filter_covariance():
  rng = np.random.default_rng(0)
  q, c, k = 3, 2, 5
  kernel = rng.normal(size=(q, q, c, k))
  got = np.asarray(jconvrfm.cnfm(jnp.asarray(kernel)))
  # Reference: entry [(u*q+v)*c+ch, (u'*q+v')*c+ch'] = sum_f K[u,v,ch,f] K[u',v',ch',f].
  want = np.zeros((q * q * c, q * q * c))
  for u, v, ch, u2, v2, ch2 in np.ndindex(q, q, c, q, q, c):
    want[(u * q + v) * c + ch, (u2 * q + v2) * c + ch2] = kernel[u, v, ch] @ kernel[u2, v2, ch2]
  tolerances.assert_rel_fro(got, want, 1e-14, 'cnfm')
  # Accepts filters flattened to (d, k) too.
  tolerances.assert_rel_fro(jconvrfm.cnfm(kernel.reshape(-1, k)), want, 1e-14, 'cnfm (d, k)')


def test_cnfm_quadratic_form_is_conv_energy():
  """p^T (W W^T) p = ||W^T p||^2 = squared conv output at that position (patch order check)."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)))
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4)))
  conv = jax.lax.conv_general_dilated(x, kernel, (1, 1), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      precision=jax.lax.Precision.HIGHEST)
  p = jconvrfm.patches(x, 3)
  quad = jnp.einsum('nijd,de,nije->nij', p, jconvrfm.cnfm(kernel), p)
  tolerances.assert_rel_fro(quad, jnp.sum(conv ** 2, axis=-1), 1e-12, 'quadratic form')


def test_cnfm_keeps_dtype():
  assert jconvrfm.cnfm(jnp.ones((3, 3, 1, 2), jnp.float32)).dtype == jnp.float32


@pytest.mark.parametrize('shape', [(7, 7), (4, 5), (30,)])
def test_correlation_matches_scipy(shape):
  rng = np.random.default_rng(2)
  a = rng.normal(size=shape)
  b = a + 0.7 * rng.normal(size=shape) + 0.5
  pearson = scipy.stats.pearsonr(a.ravel(), b.ravel())[0]
  cosine = 1 - scipy.spatial.distance.cosine(a.ravel(), b.ravel())
  np.testing.assert_allclose(jconvrfm.correlation(a, b), pearson, rtol=1e-12)
  np.testing.assert_allclose(jconvrfm.correlation(a, b, centered=False), cosine, rtol=1e-12)
  assert cosine != pytest.approx(pearson, abs=1e-3)  # the two options really differ here.


def test_correlation_invariances_and_dtype():
  rng = np.random.default_rng(3)
  a = jnp.asarray(rng.normal(size=(6, 6)), dtype=jnp.float32)
  assert jconvrfm.correlation(a, a).dtype == jnp.float32
  np.testing.assert_allclose(jconvrfm.correlation(a, 5 * a + 2), 1.0, atol=1e-6)
  np.testing.assert_allclose(jconvrfm.correlation(a, -a), -1.0, atol=1e-6)
  # A constant offset changes the cosine but not the Pearson correlation.
  a64 = np.asarray(a, np.float64)
  assert abs(float(jconvrfm.correlation(a64, a64 + 10, centered=False)) - 1) > 1e-3


def test_correlation_jit_and_vmap():
  rng = np.random.default_rng(4)
  a = rng.normal(size=(3, 5, 5))
  b = rng.normal(size=(3, 5, 5))
  got = jax.vmap(jconvrfm.correlation)(a, b)
  want = [scipy.stats.pearsonr(a[i].ravel(), b[i].ravel())[0] for i in range(3)]
  np.testing.assert_allclose(got, want, rtol=1e-12)
  np.testing.assert_allclose(jax.jit(jconvrfm.correlation)(a[0], b[0]), want[0], rtol=1e-12)


@pytest.mark.parametrize('a, b, kwargs, match', [
    (np.ones((3, 3)), np.ones((3, 4)), {}, 'same shape'),
    (np.full((3, 3), np.nan), np.ones((3, 3)), {}, 'NaN'),
    (np.eye(3), np.full((3, 3), 2.0), {}, 'constant'),
    (np.eye(3), np.zeros((3, 3)), {'centered': False}, 'all zero'),
])
def test_correlation_errors(a, b, kwargs, match):
  with pytest.raises(ValueError, match=match):
    jconvrfm.correlation(a, b, **kwargs)


def test_constant_matrix_allowed_uncentered():
  got = jconvrfm.correlation(np.ones((3, 3)), np.eye(3), centered=False)
  np.testing.assert_allclose(got, 3 / (3 * np.sqrt(3)), rtol=1e-12)


def test_sqrt_psd_matches_scipy():
  rng = np.random.default_rng(5)
  m = _random_psd(rng, 8)
  s = np.asarray(jconvrfm.sqrt_psd(m))
  tolerances.assert_rel_fro(s, np.real(scipy.linalg.sqrtm(m)), 1e-10, 'sqrt_psd vs sqrtm')
  tolerances.assert_rel_fro(s @ s, m, 1e-12, 'sqrt squared')
  np.testing.assert_allclose(s, s.T, atol=1e-12)


@pytest.mark.parametrize('p', [0.25, 0.5, 1.0, 1.5, 2.0])
def test_matrix_power_matches_scipy(p):
  rng = np.random.default_rng(6)
  m = _random_psd(rng, 6)
  want = np.real(scipy.linalg.fractional_matrix_power(m, p))
  tolerances.assert_rel_fro(jconvrfm.matrix_power_psd(m, p), want, 1e-9, f'power {p}')


def test_matrix_power_clips_negative_eigenvalues():
  rng = np.random.default_rng(7)
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  eig = np.array([-0.3, -1e-9, 1e-3, 0.5, 2.0, 4.0])
  m = (q * eig) @ q.T
  clipped = np.maximum(eig, 0)
  for p in (0.5, 1.0, 2.0):
    want = (q * clipped ** p) @ q.T
    tolerances.assert_rel_fro(jconvrfm.matrix_power_psd(m, p), want, 1e-10, f'clipped p={p}')
  # Rank-deficient PSD matrix: the root squares back to it.
  low = _random_psd(rng, 6, rank=2)
  s = jconvrfm.sqrt_psd(low)
  tolerances.assert_rel_fro(s @ s, low, 1e-7, 'rank-2 root')


def test_matrix_power_dtype_jit_vmap_and_traced_power():
  rng = np.random.default_rng(8)
  ms = np.stack([_random_psd(rng, 4) for _ in range(3)])
  assert jconvrfm.sqrt_psd(jnp.asarray(ms[0], jnp.float32)).dtype == jnp.float32
  got = jax.vmap(jconvrfm.matrix_power_psd, in_axes=(0, None))(ms, 0.5)
  for i in range(3):
    tolerances.assert_rel_fro(got[i], np.real(scipy.linalg.sqrtm(ms[i])), 1e-10, 'vmap')
  traced = jax.jit(jconvrfm.matrix_power_psd)(ms[0], jnp.asarray(2.0))
  tolerances.assert_rel_fro(traced, ms[0] @ ms[0], 1e-12, 'jit with traced power')


@pytest.mark.parametrize('m, p, error, match', [
    (np.ones((3, 4)), 0.5, ValueError, 'square'),
    (np.ones((2, 3, 3)), 0.5, ValueError, 'rank 2'),
    (np.array([[1.0, 2.0], [0.0, 1.0]]), 0.5, ValueError, 'symmetric'),
    (np.array([[1.0, np.nan], [np.nan, 1.0]]), 0.5, ValueError, 'NaN'),
    (np.eye(2), 0.0, ValueError, '> 0'),
    (np.eye(2), -0.5, ValueError, '> 0'),
    (np.eye(2), 'half', TypeError, 'p'),
])
def test_matrix_power_errors(m, p, error, match):
  with pytest.raises(error, match=match):
    jconvrfm.matrix_power_psd(m, p)


def test_cnfm_errors():
  with pytest.raises(ValueError, match='kernel'):
    jconvrfm.cnfm(np.ones((3, 3, 2)))
  with pytest.raises(ValueError, match='square'):
    jconvrfm.cnfm(np.ones((3, 2, 1, 4)))
  with pytest.raises(ValueError, match='NaN'):
    jconvrfm.cnfm(np.full((3, 3, 1, 2), np.inf))
