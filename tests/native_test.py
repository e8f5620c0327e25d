"""The native CPU kernel (`jconvrfm/_src/kernels/native.py`, `cpu/fused_cntk.cc`).

Checked against the float64 XLA path (itself checked against neural-tangents in
`kernels_test.py`), against itself over thread counts, and for its fallbacks.
"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jconvrfm
from jconvrfm._src import checks
from jconvrfm._src import predictor_agop
from jconvrfm._src.kernels import fused
from jconvrfm._src.kernels import native
from tests import tolerances

pytestmark = pytest.mark.skipif(
    native._compiler() is None, reason='no C++ compiler: the native kernel cannot be built')  # pylint: disable=protected-access

# float32 against float64 on the same float32 inputs: over the parametrised cases below the
# native path sits at most 2.2e-7 (relative Frobenius) from the float64 kernel, the XLA
# float32 path at most 9e-8 (2-core Xeon, 2026-11-29).
_F32_TOL = 1e-6


def _images(rng, n, h, w, c):
  return rng.normal(size=(n, h, w, c)).astype(np.float32)


def _psd(rng, d, rank=None):
  a = rng.normal(size=(d, rank or d))
  return (a @ a.T / (rank or d)).astype(np.float32)


def _raw(x1, x2, metric, depth, q, padding, kind):
  """A fresh trace of the fused kernel (environment switches are read while tracing)."""
  fn = fused.fused_conv_kernel.__wrapped__
  return jax.jit(lambda a, b, m: fn(a, b, m, depth, q, checks.Padding(padding),
                                    fused.Kind(kind)))(x1, x2, metric)


def _float64_reference(x1, x2, metric, depth, q, padding, kind):
  m = None if metric is None else jnp.asarray(metric, jnp.float64)
  return fused._xla_conv_kernel(jnp.asarray(x1, jnp.float64), jnp.asarray(x2, jnp.float64), m,  # pylint: disable=protected-access
                                depth, q, checks.Padding(padding), fused.Kind(kind), None)


def _uses_custom_call(x1, x2, metric, depth=2, q=3, padding='VALID', kind='ntk'):
  fn = fused.fused_conv_kernel.__wrapped__
  text = jax.jit(lambda a, b, m: fn(a, b, m, depth, q, checks.Padding(padding),
                                    fused.Kind(kind))).lower(x1, x2, metric).as_text()
  return native.TARGET in text


def _uses_pixel_call(x1, x2, depth=2, q=3, padding='VALID', kind='ntk'):
  fn = fused.fused_conv_kernel.__wrapped__
  text = jax.jit(lambda a, b: fn(a, b, None, depth, q, checks.Padding(padding),
                                 fused.Kind(kind))).lower(x1, x2).as_text()
  return native.PIXELS_TARGET in text


def test_native_kernel_builds_and_float32_calls_take_it():
  assert native.available(), native.unavailable_reason()
  rng = np.random.default_rng(0)
  x = _images(rng, 3, 8, 8, 1)
  assert _uses_custom_call(x, x, None)
  # float64 keeps the XLA path (exact arccos).
  assert not _uses_custom_call(x.astype(np.float64), x.astype(np.float64), None)


@pytest.mark.parametrize('padding', ['VALID', 'SAME', 'CIRCULAR'])
@pytest.mark.parametrize('kind', ['ntk', 'nngp'])
@pytest.mark.parametrize('q,depth,channels,with_metric', [
    (3, 3, 1, True), (3, 1, 1, False), (2, 2, 3, True), (5, 2, 2, False), (4, 3, 2, True)])
def test_native_kernel_equals_float64_reference(padding, kind, q, depth, channels,
                                                with_metric):
  rng = np.random.default_rng(q * 100 + depth * 10 + channels)
  # n2 = 21: one full block of 16 column images and a padded one.
  x1, x2 = _images(rng, 5, 13, 12, channels), _images(rng, 21, 13, 12, channels)
  metric = _psd(rng, q * q * channels) if with_metric else None
  got = _raw(x1, x2, metric, depth, q, padding, kind)
  assert got.dtype == jnp.float32 and got.shape == (5, 21)
  want = _float64_reference(x1, x2, metric, depth, q, padding, kind)
  tolerances.assert_rel_fro(got, want, _F32_TOL, f'{padding} {kind} q={q} depth={depth}')
  # Entry by entry too, not only in norm.
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5,
                             atol=2e-5 * float(np.max(np.abs(want))))


@pytest.mark.parametrize('channels,pixels', [(1, False), (8, True)])
def test_native_kernel_handles_zero_patches_like_the_reference(channels, pixels):
  # Zero regions (and, on the patch call, a low-rank metric) give zero variances at some
  # positions of some layers: R = 0 and D = 1/2 there (fused.py's convention), in every layer.
  # channels = 8 (d = 72, the identity metric) goes to the pixel call.
  rng = np.random.default_rng(18 if pixels else 5)
  x1, x2 = _images(rng, 4, 10, 10, channels), _images(rng, 18, 10, 10, channels)
  x1[0] = 0.0                     # a whole zero image
  x1[1, :6] = 0.0                 # a zero band: zero patches in layer 1 only partly
  x2[3, :, :7] = 0.0
  metric = None if pixels else _psd(rng, 9 * channels, rank=2)
  assert _uses_pixel_call(x1, x2) == pixels
  for kind in ('ntk', 'nngp'):
    got = _raw(x1, x2, metric, 3, 3, 'VALID', kind)
    want = _float64_reference(x1, x2, metric, 3, 3, 'VALID', kind)
    assert bool(jnp.all(jnp.isfinite(got)))
    np.testing.assert_array_equal(np.asarray(got[0]), 0.0)
    tolerances.assert_rel_fro(got, want, _F32_TOL, f'zero patches {kind}')


def test_native_kernel_is_independent_of_the_thread_count(monkeypatch):
  # Every entry is computed by the same code whichever thread runs its column block.
  rng = np.random.default_rng(6)
  x1, x2 = _images(rng, 7, 12, 12, 2), _images(rng, 70, 12, 12, 2)
  outs = []
  for n in ('1', '3', '8'):
    monkeypatch.setenv('JCONVRFM_NATIVE_THREADS', n)
    outs.append(np.asarray(_raw(x1, x2, None, 2, 3, 'SAME', 'ntk')))
  np.testing.assert_array_equal(outs[0], outs[1])
  np.testing.assert_array_equal(outs[0], outs[2])


def test_bad_thread_count_names_the_variable(monkeypatch):
  monkeypatch.setenv('JCONVRFM_NATIVE_THREADS', '0')
  with pytest.raises(ValueError, match='JCONVRFM_NATIVE_THREADS'):
    native.threads()
  monkeypatch.setenv('JCONVRFM_NATIVE_THREADS', 'many')
  with pytest.raises(ValueError, match='JCONVRFM_NATIVE_THREADS'):
    native.threads()


def test_native_kernel_derivatives_match_finite_differences():
  # Derivatives go through the XLA path (custom JVP); check them against central differences
  # of the float64 kernel, for the images and for the metric.
  rng = np.random.default_rng(7)
  x1, x2 = _images(rng, 2, 9, 9, 1), _images(rng, 3, 9, 9, 1)
  metric = _psd(rng, 9)
  w = rng.normal(size=(2, 3))

  def loss32(a, m):
    return jnp.sum(jnp.asarray(w, jnp.float32) * jconvrfm.conv_ntk(a, x2, depth=2,
                                                                    patch_size=3, metric=m))

  def loss64(a, m):
    return jnp.sum(w * _float64_reference(a, x2, m, 2, 3, 'VALID', 'ntk'))

  gx, gm = jax.grad(loss32, argnums=(0, 1))(jnp.asarray(x1), jnp.asarray(metric))
  x64, m64 = x1.astype(np.float64), metric.astype(np.float64)
  for _ in range(4):
    dx = rng.normal(size=x1.shape)
    dm = rng.normal(size=metric.shape)
    dm = dm + dm.T
    eps = 1e-5
    fd = (loss64(x64 + eps * dx, m64 + eps * dm) - loss64(x64 - eps * dx, m64 - eps * dm)) / (
        2 * eps)
    ad = float(jnp.sum(gx * dx) + jnp.sum(gm * dm))
    assert abs(ad - float(fd)) <= 1e-4 * max(abs(float(fd)), 1.0), (ad, float(fd))


def test_native_kernel_under_vmap_and_jit():
  rng = np.random.default_rng(8)
  xs = _images(rng, 12, 9, 9, 1).reshape(3, 4, 9, 9, 1)
  y = _images(rng, 5, 9, 9, 1)
  fn = jax.jit(jax.vmap(lambda a: jconvrfm.conv_ntk(a, y, depth=2, patch_size=3)))
  batched = fn(xs)
  for i in range(3):
    tolerances.assert_rel_fro(batched[i], _float64_reference(xs[i], y, None, 2, 3, 'VALID',
                                                             'ntk'), _F32_TOL, f'vmap {i}')


def test_switched_off_or_unbuildable_native_kernel_falls_back_to_xla(monkeypatch, tmp_path):
  rng = np.random.default_rng(9)
  x1, x2 = _images(rng, 3, 8, 8, 1), _images(rng, 4, 8, 8, 1)
  want = _float64_reference(x1, x2, None, 2, 3, 'VALID', 'ntk')
  monkeypatch.setenv('JCONVRFM_NATIVE', '0')
  assert not _uses_custom_call(x1, x2, None)
  tolerances.assert_rel_fro(_raw(x1, x2, None, 2, 3, 'VALID', 'ntk'), want, _F32_TOL, 'off')
  monkeypatch.delenv('JCONVRFM_NATIVE')
  # A compiler that does not exist: the build fails once, with the reason kept and logged.
  monkeypatch.setattr(native, '_state', {'tried': False, 'ok': False, 'reason': None,
                                         'path': None})
  monkeypatch.setenv('JCONVRFM_CACHE_DIR', str(tmp_path / 'cache'))
  monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
  assert not native.available()
  assert 'no-such-compiler' in native.unavailable_reason()
  assert not _uses_custom_call(x1, x2, None)
  tolerances.assert_rel_fro(_raw(x1, x2, None, 2, 3, 'VALID', 'ntk'), want, _F32_TOL,
                            'unbuildable')


def test_build_is_cached_per_cache_dir(monkeypatch, tmp_path):
  if shutil.which('c++') is None and shutil.which('g++') is None:
    pytest.skip('no c++ / g++ on PATH')
  monkeypatch.setenv('JCONVRFM_CACHE_DIR', str(tmp_path))
  first = native._build()  # pylint: disable=protected-access
  assert first.parent == tmp_path and first.exists()
  stamp = first.stat().st_mtime_ns
  assert native._build() == first  # pylint: disable=protected-access
  assert first.stat().st_mtime_ns == stamp  # reused, not rebuilt


@pytest.mark.parametrize('padding,kind,depth,q', [
    ('VALID', 'ntk', 3, 3), ('SAME', 'ntk', 2, 2), ('CIRCULAR', 'ntk', 1, 3),
    ('VALID', 'nngp', 3, 3), ('SAME', 'nngp', 2, 3), ('CIRCULAR', 'nngp', 2, 2)])
def test_native_gram_grads_are_as_accurate_as_xla_float32(padding, kind, depth, q):
  # The kernel and its gradients w.r.t. the Grams (the predictor AGOP's reverse pass) against
  # the float64 hand-written reverse pass (itself checked against autodiff and brute force in
  # predictor_agop_test.py). The gradients of this ill-conditioned map lose accuracy in
  # float32 on any path, so the native path must be within a small factor of the XLA float32
  # path's own error, and below 2e-6 outright (measured: at most 2.8e-7 on both paths, 2-core
  # Xeon, 2026-11-29). (Pairs at zero angle are left out: there the
  # derivative 1 / sin t is singular and float32 rounding decides its value on either path;
  # the AGOP sets those Gram entries exactly, see the predictor AGOP test below.)
  rng = np.random.default_rng(sum(map(ord, padding + kind)) + depth)
  x1, x2 = rng.normal(size=(3, 11, 10, 2)), rng.normal(size=(32, 11, 10, 2))
  x1[0, :5] = 0.0     # zero patches: zero variances, the R = 0, D = 1/2 convention
  x2[7, :, :6] = 0.0
  p1, p2 = (np.asarray(jconvrfm.patches(jnp.asarray(x), q, padding='VALID')) for x in (x1, x2))
  m = _psd(rng, q * q * 2).astype(np.float64)
  g12 = np.einsum('ahwd,de,bhwe->hwab', p1, m, p2)
  g1 = np.einsum('ahwd,de,ahwe->hwa', p1, m, p1)
  g2 = np.einsum('bhwd,de,bhwe->hwb', p2, m, p2)
  pad, knd = checks.Padding(padding), fused.Kind(kind)
  want = fused.kernel_and_gram_grads_internal(g12, g1, g2, depth, q, pad, 2, knd)
  g32 = [jnp.asarray(v, jnp.float32) for v in (g12, g1, g2)]
  got = jax.jit(lambda a, b, c: native.kernel_and_gram_grads(a, b, c, depth, q, pad, 2,
                                                             kind == 'ntk'))(*g32)
  xla32 = fused.kernel_and_gram_grads_internal(*g32, depth, q, pad, 2, knd)
  for name, n, x, w in zip(('K', 'dK/dg12', 'dK/dg1', 'dK/dg2'), got, xla32, want):
    assert n.shape == w.shape and n.dtype == jnp.float32
    err, err_xla = tolerances.rel_fro(n, w), tolerances.rel_fro(x, w)
    assert err <= 2e-6 and err <= 3 * err_xla + 1e-7, (name, err, err_xla)


def test_native_gram_grads_reject_unaligned_blocks():
  g = jnp.zeros((4, 4, 2, 20), jnp.float32)
  with pytest.raises(ValueError, match='multiple of 16'):
    native.kernel_and_gram_grads(g, jnp.zeros((4, 4, 2), jnp.float32),
                                 jnp.zeros((4, 4, 20), jnp.float32), 2, 3,
                                 checks.Padding.VALID, 1, True)



# ----------------------------------------------------------------------------------------------
# The fused predictor AGOP (`native.predictor_agop_rows`, routed by `predictor_agop`).
# ----------------------------------------------------------------------------------------------


def _agop(x, alpha, q, depth, padding, kind, metric, native_flag, z=None, z_indices=None):
  k = fused.GramConvKernel(depth=depth, patch_size=q, padding=checks.Padding(padding),
                           channels=x.shape[-1], kind=fused.Kind(kind))
  return predictor_agop.predictor_agop_from_grams(
      k, x, alpha, z, z_indices=z_indices, patch_size=q, padding=padding, metric=metric,
      native=native_flag)


# float32 native AGOP against the float64 XLA path on the same float32 inputs: at most
# 2.5e-7 (relative Frobenius) over the cases below (2-core Xeon, 2026-11-29).
@pytest.mark.parametrize('padding,kind,q,depth,channels,classes,with_metric', [
    ('SAME', 'ntk', 3, 3, 1, 10, True), ('VALID', 'ntk', 3, 2, 2, 3, False),
    ('CIRCULAR', 'ntk', 2, 2, 2, 4, True), ('VALID', 'nngp', 3, 3, 1, 2, True),
    ('SAME', 'nngp', 2, 1, 3, 5, False), ('CIRCULAR', 'nngp', 3, 2, 1, 1, True)])
def test_native_predictor_agop_equals_float64_reference(padding, kind, q, depth, channels,
                                                         classes, with_metric):
  # 37 training images: two full blocks of 16 lanes and a padded one; the samples are all of
  # them (pairs of an image with itself take the exact-Gram convention) or fresh images.
  rng = np.random.default_rng(sum(map(ord, padding + kind)) + 10 * q + depth)
  x = _images(rng, 37, 9, 8, channels)
  alpha = rng.normal(size=(37, classes)).astype(np.float32)
  metric = _psd(rng, q * q * channels) if with_metric else None
  z = _images(rng, 5, 9, 8, channels)
  m64 = None if metric is None else jnp.asarray(metric, jnp.float64)
  x64, a64, z64 = (jnp.asarray(v, jnp.float64) for v in (x, alpha, z))
  for name, kw, kw64 in (('training samples', {'z_indices': np.arange(37)},
                          {'z_indices': np.arange(37)}),
                         ('subset', {'z_indices': np.arange(3, 30, 2)},
                          {'z_indices': np.arange(3, 30, 2)}),
                         ('fresh samples', {'z': z}, {'z': z64})):
    got = _agop(x, alpha, q, depth, padding, kind, metric, True, **kw)
    want = _agop(x64, a64, q, depth, padding, kind, m64, False, **kw64)
    assert got.dtype == jnp.float32 and got.shape == want.shape
    tolerances.assert_rel_fro(got, want, _F32_TOL, name)


def test_native_predictor_agop_handles_zero_patches_like_the_reference():
  # Zero images and zero bands (zero variances, R = 0 and D = 1/2) and a low-rank metric. The
  # rank-2 metric makes many patch pairs nearly parallel, where the NTK's derivative
  # 1 / sin t is ill-conditioned and float32 loses accuracy on any path: the native path must
  # then be within 2x of the XLA float32 path's own error (measured against float64, 2-core
  # Xeon, 2026-11-29: NTK 2.4e-5 native, 4.0e-5 XLA; NNGP 5.6e-8 and 1.2e-7).
  rng = np.random.default_rng(11)
  x = _images(rng, 20, 10, 10, 1)
  x[0] = 0.0
  x[4, :6] = 0.0
  x[9, :, :7] = 0.0
  alpha = rng.normal(size=(20, 3)).astype(np.float32)
  metric = _psd(rng, 9, rank=2)
  for kind in ('ntk', 'nngp'):
    got = _agop(x, alpha, 3, 3, 'VALID', kind, metric, True, z_indices=np.arange(20))
    xla32 = _agop(x, alpha, 3, 3, 'VALID', kind, metric, False, z_indices=np.arange(20))
    want = _agop(jnp.asarray(x, jnp.float64), jnp.asarray(alpha, jnp.float64), 3, 3, 'VALID',
                 kind, jnp.asarray(metric, jnp.float64), False, z_indices=np.arange(20))
    assert bool(jnp.all(jnp.isfinite(got)))
    err, err_xla = tolerances.rel_fro(got, want), tolerances.rel_fro(xla32, want)
    assert err <= max(_F32_TOL, 2 * err_xla), (kind, err, err_xla)


def test_native_predictor_agop_is_the_default_and_independent_of_threads(monkeypatch):
  # float32 on the CPU takes the native path by default; every sample's sum is computed by the
  # same code whichever thread owns it, so the result is bitwise the same for any count.
  rng = np.random.default_rng(12)
  x, alpha = _images(rng, 35, 8, 8, 1), rng.normal(size=(35, 4)).astype(np.float32)
  calls = []
  real = native.predictor_agop_rows
  monkeypatch.setattr(native, 'predictor_agop_rows',
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  outs = []
  for n in ('1', '3'):
    monkeypatch.setenv('JCONVRFM_NATIVE_THREADS', n)
    jax.clear_caches()
    outs.append(np.asarray(_agop(x, alpha, 3, 2, 'SAME', 'ntk', None, None,
                                 z_indices=np.arange(35))))
  assert calls
  np.testing.assert_array_equal(outs[0], outs[1])


def test_native_predictor_agop_falls_back_and_says_why(monkeypatch):
  rng = np.random.default_rng(13)
  x, alpha = _images(rng, 18, 8, 8, 1), rng.normal(size=(18, 2)).astype(np.float32)
  x64, a64 = jnp.asarray(x, jnp.float64), jnp.asarray(alpha, jnp.float64)
  with pytest.raises(ValueError, match='float64, not float32'):
    _agop(x64, a64, 3, 2, 'SAME', 'ntk', None, True, z_indices=np.arange(18))
  with pytest.raises(TypeError, match='`native`'):
    _agop(x, alpha, 3, 2, 'SAME', 'ntk', None, 'yes', z_indices=np.arange(18))
  # Switched off, the default is the XLA path: bitwise what native=False computes.
  want = _agop(x, alpha, 3, 2, 'SAME', 'ntk', None, False, z_indices=np.arange(18))
  monkeypatch.setenv('JCONVRFM_NATIVE', '0')
  with pytest.raises(ValueError, match='JCONVRFM_NATIVE'):
    _agop(x, alpha, 3, 2, 'SAME', 'ntk', None, True, z_indices=np.arange(18))
  got = _agop(x, alpha, 3, 2, 'SAME', 'ntk', None, None, z_indices=np.arange(18))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_native_predictor_agop_reports_progress_per_chunk():
  rng = np.random.default_rng(14)
  x, alpha = _images(rng, 21, 8, 8, 1), rng.normal(size=(21, 2)).astype(np.float32)
  done = []
  k = fused.GramConvKernel(depth=2, patch_size=3, padding=checks.Padding.SAME, channels=1)
  predictor_agop.predictor_agop_from_grams(k, x, alpha, z_indices=np.arange(21), patch_size=3,
                                           padding='SAME', progress=done.append, native=True)
  assert sum(done) == 21 and len(done) > 1


def test_native_predictor_agop_rows_rejects_bad_blocking():
  rng = np.random.default_rng(15)
  x = jnp.asarray(_images(rng, 16, 6, 6, 1))
  p = jconvrfm.patches(x, 3, padding='SAME')
  sq = jnp.sum(p * p, axis=-1)
  blocks = native.train_blocks(p, sq, jnp.ones((16, 2), jnp.float32))
  for group, tile in ((0, 1), (17, 1), (4, 0)):
    with pytest.raises(ValueError, match='group|row_tile'):
      native.predictor_agop_rows(p, p, sq, jnp.arange(16), blocks, 2, 3, checks.Padding.SAME,
                                 1, True, group=group, row_tile=tile)


# ----------------------------------------------------------------------------------------------
# Whole kernel matrices without tiles (`fused.native_kernel_matrix`, used by ConvRFM).
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('padding,kind,n', [('SAME', 'ntk', 37), ('VALID', 'nngp', 50),
                                            ('CIRCULAR', 'ntk', 16), ('SAME', 'ntk', 3)])
def test_native_kernel_matrix_equals_float64_reference(padding, kind, n):
  rng = np.random.default_rng(sum(map(ord, padding + kind)) + n)
  x, y = _images(rng, n, 9, 8, 2), _images(rng, 23, 9, 8, 2)
  metric = _psd(rng, 18)
  pad, knd = checks.Padding(padding), fused.Kind(kind)
  done = []
  sym = fused.native_kernel_matrix(jnp.asarray(x), None, jnp.asarray(metric), 3, 3, pad, knd,
                                   progress=lambda d, t: done.append((d, t)))
  want = _float64_reference(x, x, metric, 3, 3, padding, kind)
  assert sym.shape == (n, n) and sym.dtype == np.float32
  np.testing.assert_array_equal(sym, sym.T)
  tolerances.assert_rel_fro(sym, want, _F32_TOL, 'symmetric')
  # The diagonal pairs take the correlation 1 exactly (not 1e-4 off as a rounded one gives).
  tolerances.assert_rel_fro(np.diag(sym), np.diag(want), _F32_TOL, 'diagonal')
  assert done and done[-1][0] == done[-1][1] == len(done)
  rect = fused.native_kernel_matrix(jnp.asarray(x), jnp.asarray(y), jnp.asarray(metric), 3, 3,
                                    pad, knd)
  tolerances.assert_rel_fro(rect, _float64_reference(x, y, metric, 3, 3, padding, kind),
                            _F32_TOL, 'rectangular')


def test_native_kernel_matrix_does_not_apply_to_float64_or_when_switched_off(monkeypatch):
  x = jnp.asarray(_images(np.random.default_rng(16), 5, 8, 8, 1))
  args = (None, None, 2, 3, checks.Padding.SAME, fused.Kind.NTK)
  assert fused.native_kernel_matrix(x.astype(jnp.float64), *args) is None
  assert fused.native_kernel_matrix(x, *args) is not None
  monkeypatch.setenv('JCONVRFM_NATIVE', '0')
  assert fused.native_kernel_matrix(x, *args) is None


def test_large_patch_dimensions_with_a_metric_keep_the_xla_path():
  # The patch-based custom calls form every image's patches: past native.MAX_PATCH_DIM the
  # tiler's per-entry memory probe would cut matrices into needlessly many tiles (see
  # native.py). The identity metric goes to the pixel call instead, whose operands are the
  # images themselves.
  rng = np.random.default_rng(17)
  c = native.MAX_PATCH_DIM // 9 + 1                     # q = 3: d = 9 c > MAX_PATCH_DIM
  x = _images(rng, 3, 6, 6, c)
  metric = _psd(rng, 9 * c)
  assert not _uses_custom_call(x, x, metric)
  assert not _uses_custom_call(x, x, None)
  assert _uses_pixel_call(x, x)
  small = x[..., :native.MAX_PATCH_DIM // 9]
  assert _uses_custom_call(small, small, None) and not _uses_pixel_call(small, small)
  assert fused.native_kernel_matrix(jnp.asarray(x), None, jnp.asarray(metric), 2, 3,
                                    checks.Padding.SAME, fused.Kind.NTK) is None
  with pytest.raises(ValueError, match='patch dimension'):
    _agop(x, np.ones((3, 2), np.float32), 3, 2, 'SAME', 'ntk', None, True,
          z_indices=np.arange(3))


# ----------------------------------------------------------------------------------------------
# The identity-metric kernel from pixels (`native.from_pixels`: deep layers, d > 64).
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('padding', ['VALID', 'SAME', 'CIRCULAR'])
@pytest.mark.parametrize('kind', ['ntk', 'nngp'])
@pytest.mark.parametrize('q,depth,channels', [(3, 2, 8), (2, 3, 17), (3, 1, 9), (4, 2, 5)])
def test_pixel_kernel_equals_float64_reference(padding, kind, q, depth, channels):
  rng = np.random.default_rng(1000 + q * 100 + depth * 10 + channels)
  # n2 = 21: one full block of 16 column images and a padded one; 9 x 8 images.
  x1, x2 = _images(rng, 5, 9, 8, channels), _images(rng, 21, 9, 8, channels)
  assert q * q * channels > native.MAX_PATCH_DIM
  assert _uses_pixel_call(x1, x2, depth, q, padding, kind)
  got = _raw(x1, x2, None, depth, q, padding, kind)
  assert got.dtype == jnp.float32 and got.shape == (5, 21)
  want = _float64_reference(x1, x2, None, depth, q, padding, kind)
  tolerances.assert_rel_fro(got, want, _F32_TOL, f'{padding} {kind} q{q} d{depth} c{channels}')


def test_pixel_kernel_is_independent_of_tiles_and_threads(monkeypatch):
  # Each per-pixel Gram sums its channels in the same order in every micro-kernel (one or two
  # column blocks, any number of rows), and each pair block runs the same recursion.
  rng = np.random.default_rng(19)
  x1, x2 = jnp.asarray(_images(rng, 19, 8, 7, 10)), jnp.asarray(_images(rng, 70, 8, 7, 10))
  outs = []
  for threads, row_tile, group in (('1', 1, 1), ('2', 3, 2), ('3', 16, 3), ('8', 40, 5)):
    monkeypatch.setenv('JCONVRFM_NATIVE_THREADS', threads)
    outs.append(np.asarray(jax.jit(lambda a, b, rt=row_tile, g=group: native.kernel(
        a, b, None, 2, 3, checks.Padding.SAME, True, row_tile=rt, group=g))(x1, x2)))
  for out in outs[1:]:
    np.testing.assert_array_equal(out, outs[0])
  with pytest.raises(ValueError, match='row_tile and group'):
    native.kernel(x1, x2, None, 2, 3, checks.Padding.SAME, True, row_tile=0)


@pytest.mark.parametrize('padding,kind,n', [('VALID', 'ntk', 37), ('SAME', 'nngp', 20)])
def test_pixel_kernel_matrix_equals_float64_reference(padding, kind, n):
  # Whole matrices as ConvRFM builds them for a Deep ConvRFM layer on many feature maps:
  # symmetric (upper triangle, mirrored) and rectangular.
  rng = np.random.default_rng(sum(map(ord, padding + kind)) + n)
  x, y = _images(rng, n, 9, 8, 12), _images(rng, 23, 9, 8, 12)
  pad, knd = checks.Padding(padding), fused.Kind(kind)
  sym = fused.native_kernel_matrix(jnp.asarray(x), None, None, 2, 3, pad, knd)
  want = _float64_reference(x, x, None, 2, 3, padding, kind)
  assert sym.shape == (n, n) and sym.dtype == np.float32
  np.testing.assert_array_equal(sym, sym.T)
  tolerances.assert_rel_fro(sym, want, _F32_TOL, 'symmetric')
  tolerances.assert_rel_fro(np.diag(sym), np.diag(want), _F32_TOL, 'diagonal')
  rect = fused.native_kernel_matrix(jnp.asarray(x), jnp.asarray(y), None, 2, 3, pad, knd)
  tolerances.assert_rel_fro(rect, _float64_reference(x, y, None, 2, 3, padding, kind),
                            _F32_TOL, 'rectangular')


def test_pixel_kernel_derivatives_go_through_the_xla_path():
  # Derivatives (custom JVP) are the XLA path's; checked against central differences in
  # float64 of the same kernel.
  rng = np.random.default_rng(20)
  x1, x2 = _images(rng, 2, 7, 7, 8), _images(rng, 3, 7, 7, 8)
  direction = rng.normal(size=x1.shape).astype(np.float32)
  f32 = lambda a: _raw(a, x2, None, 2, 3, 'SAME', 'ntk').sum()
  _, jvp = jax.jvp(f32, (jnp.asarray(x1),), (jnp.asarray(direction),))
  f64 = lambda a: _float64_reference(a, x2, None, 2, 3, 'SAME', 'ntk').sum()
  eps = 1e-4
  fd = (f64(x1.astype(np.float64) + eps * direction) -
        f64(x1.astype(np.float64) - eps * direction)) / (2 * eps)
  np.testing.assert_allclose(float(jvp), float(fd), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Learned metrics past 64: the pixel call on patch features (`fused.metric_kernel_matrix`).
# ----------------------------------------------------------------------------------------------


# Every padding with both kinds, each shape twice (the calls share all code across them).
@pytest.mark.parametrize('padding,kind,q,depth,channels', [
    ('VALID', 'ntk', 3, 2, 8), ('SAME', 'nngp', 3, 2, 8), ('CIRCULAR', 'ntk', 2, 3, 17),
    ('VALID', 'nngp', 2, 3, 17), ('SAME', 'ntk', 3, 1, 9), ('CIRCULAR', 'nngp', 3, 1, 9)])
def test_feature_kernel_matrix_equals_float64_reference(padding, kind, q, depth, channels):
  rng = np.random.default_rng(2000 + q * 100 + depth * 10 + channels)
  d = q * q * channels
  assert d > native.MAX_PATCH_DIM
  x, y = _images(rng, 37, 9, 8, channels), _images(rng, 21, 9, 8, channels)
  metric = _psd(rng, d)
  pad, knd = checks.Padding(padding), fused.Kind(kind)
  text = jax.jit(lambda a, c, f: fused._native_feature_rows(  # pylint: disable=protected-access
      a, c, f, depth=depth, q=q, padding=pad, channels=channels, kind=knd)).lower(
          jnp.zeros((4, 3, 3, d)), native.feature_columns(jnp.zeros((16, 3, 3, d))),
          jnp.int32(-1)).as_text()
  assert native.PIXELS_TARGET in text
  sym = fused.metric_kernel_matrix(jnp.asarray(x), None, jnp.asarray(metric), depth, q, pad,
                                   knd)
  want = _float64_reference(x, x, metric, depth, q, padding, kind)
  assert sym.dtype == np.float32
  np.testing.assert_array_equal(sym, sym.T)
  tolerances.assert_rel_fro(sym, want, _F32_TOL, 'symmetric')
  # Diagonal pairs take the correlation 1 exactly: the float64 self kernel, not the
  # reference's diagonal through the arccos kink.
  diag = fused.fused_self_kernel(jnp.asarray(x, jnp.float64), jnp.asarray(metric, jnp.float64),
                                 depth, q, pad, knd)
  tolerances.assert_rel_fro(np.diag(sym), diag, _F32_TOL, 'diagonal')
  rect = fused.metric_kernel_matrix(jnp.asarray(x), jnp.asarray(y), jnp.asarray(metric),
                                    depth, q, pad, knd)
  tolerances.assert_rel_fro(rect, _float64_reference(x, y, metric, depth, q, padding, kind),
                            _F32_TOL, 'rectangular')


def test_feature_kernel_matrix_is_independent_of_chunks_tiles_and_threads(monkeypatch):
  # Column chunks (16 images at the smallest budget), row tiles, groups and threads change
  # which pairs a call computes together, never a pair's sums: bitwise the same matrix.
  rng = np.random.default_rng(21)
  x, y = jnp.asarray(_images(rng, 45, 7, 7, 8)), jnp.asarray(_images(rng, 40, 7, 7, 8))
  metric = jnp.asarray(_psd(rng, 72, rank=30))
  args = (metric, 2, 3, checks.Padding.SAME, fused.Kind.NTK)
  small = (16 + fused._FEATURE_ROWS) * 49 * 72 * 4  # pylint: disable=protected-access
  outs = {}
  for threads, budget in (('1', fused.FEATURE_BYTES), ('3', small)):
    monkeypatch.setenv('JCONVRFM_NATIVE_THREADS', threads)
    outs[threads] = (fused.metric_kernel_matrix(x, None, *args, feature_bytes=budget),
                     fused.metric_kernel_matrix(x, y, *args, feature_bytes=budget))
  for a, b in zip(outs['1'], outs['3']):
    np.testing.assert_array_equal(a, b)
  t1 = fused._metric_features_jit(x, fused.metric_factor(metric), q=3,  # pylint: disable=protected-access
                                  padding=checks.Padding.SAME)
  cols = native.feature_columns(t1[:40])
  base = native.kernel_from_feature_columns(t1, cols, 2, 3, checks.Padding.SAME, True, 8)
  for row_tile, group in ((1, 1), (5, 3), (40, 2)):
    np.testing.assert_array_equal(
        native.kernel_from_feature_columns(t1, cols, 2, 3, checks.Padding.SAME, True, 8,
                                           row_tile=row_tile, group=group), base)
  with pytest.raises(ValueError, match='row_tile and group'):
    native.kernel_from_feature_columns(t1, cols, 2, 3, checks.Padding.SAME, True, 8, group=0)


# ------------------------------------------------------------------------------------------
# The feature AGOP's class-weighted per-position products.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize('samples,classes,inner,cols,t0', [
    (5, 7, 37, 80, 3),      # 35 rows: a 5-row tail tile; 80 columns: a 1-vector tail panel
    (4, 3, 16, 64, 0),      # whole tiles and panels, the block at the start
    (1, 1, 5, 16, 9),       # one row, one vector, the block at the end
])
def test_weighted_position_gemm_equals_float64_einsum(samples, classes, inner, cols, t0):
  rng = np.random.default_rng(40 + samples)
  positions, n = 3, inner + 12 if t0 else inner
  a = rng.normal(size=(positions, samples, inner))
  alpha = rng.normal(size=(n, classes))
  t = rng.normal(size=(positions, n, cols))
  c = rng.normal(size=(positions, samples * classes, cols))
  want = c + np.einsum('pbi,ik,pin->pbkn', a, alpha[t0:t0 + inner],
                       t[:, t0:t0 + inner]).reshape(c.shape)
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  got = jax.jit(native.weighted_position_gemm, donate_argnums=4)(
      f32(a), f32(alpha), f32(t), jnp.int32(t0), f32(c))
  assert got.shape == c.shape and got.dtype == jnp.float32
  tolerances.assert_rel_fro(got, want, 1e-6, 'weighted position gemm')


def test_weighted_position_gemm_rejects_bad_shapes():
  z = lambda *s: jnp.zeros(s, jnp.float32)
  with pytest.raises(Exception, match='multiple of 16'):  # N = 20
    jax.block_until_ready(native.weighted_position_gemm(
        z(2, 3, 4), z(4, 2), z(2, 4, 20), jnp.int32(0), z(2, 6, 20)))
  with pytest.raises(Exception, match='outside'):         # [3, 7) past 4 images
    jax.block_until_ready(native.weighted_position_gemm(
        z(2, 3, 4), z(4, 2), z(2, 4, 16), jnp.int32(3), z(2, 6, 16)))
