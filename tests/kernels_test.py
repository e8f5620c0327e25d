"""Tests for `jconvrfm.conv_ntk`, the fused closed form and the neural-tangents path.

References held against the fused kernel: neural-tangents `stax` on expanded images (the
paper's construction), Monte Carlo estimates from wide finite Flax networks, central finite
differences, the exact identity `M = I` (metric path == identity path), and symmetric
(two-sided) limits at zero patches.
"""

import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jconvrfm
from jconvrfm._src.kernels import fused
from jconvrfm._src.kernels import nt as nt_lib
from tests import tolerances

PADDINGS = ('VALID', 'SAME', 'CIRCULAR')


def _random_psd(rng, d, dtype=np.float64, rank=None):
  a = rng.normal(size=(d, rank or d))
  return jnp.asarray(a @ a.T / d, dtype)


def _images(rng, n, h, w, c, dtype=np.float64):
  return jnp.asarray(rng.uniform(-1, 1, size=(n, h, w, c)), dtype)


# ------------------------------------------------------------------------------------------
# Fused == neural-tangents over the whole grid.
# ------------------------------------------------------------------------------------------


# Deepest kernel compared per patch size: the recursion is the same for every q, so depths 4
# and 5 are compared at q = 3 only (q = 5 at depth 5 under VALID needs 22 x 23 images, which
# made this grid the slowest test of the suite).
_GRID_DEPTHS = {3: 5, 5: 3}


def _grid_sizes(padding, q):
  """Small non-square images; under VALID the deepest map is 2 x 3. One size per (padding,
  q) for all depths, so that op-by-op execution reuses its compiled ops across depths."""
  if padding == 'VALID':
    return _GRID_DEPTHS[q] * (q - 1) + 2, _GRID_DEPTHS[q] * (q - 1) + 3
  return 8, 7


@pytest.mark.parametrize('padding', PADDINGS)
def test_fused_matches_neural_tangents_grid(padding):
  """depth 1..5 (q = 3) or 1..3 (q = 5) x c in {1, 3} x {no metric, random PSD metric} x kinds.

  Runs op by op (`disable_jit`): the grid would otherwise spend minutes compiling; the
  compiled path is compared in `test_fused_compiled_float32_matches_nt` and elsewhere.
  """
  rng = np.random.default_rng(PADDINGS.index(padding))
  worst = {np.float64: 0.0}
  with jax.disable_jit():
    for q, c, use_metric in itertools.product((3, 5), (1, 3), (False, True)):
      metric64 = _random_psd(rng, q * q * c) if use_metric else None
      h, w = _grid_sizes(padding, q)
      x1 = _images(rng, 3, h, w, c)
      x2 = _images(rng, 4, h, w, c)
      for depth in range(1, _GRID_DEPTHS[q] + 1):
        # float32 across the grid would double the runtime; it is covered by the compiled
        # comparison below (all paddings, both kinds, with a metric).
        for dtype, tol in ((np.float64, 1e-6),):
          a, b = x1.astype(dtype), x2.astype(dtype)
          metric = None if metric64 is None else metric64.astype(dtype)
          _, _, kernel_fn = nt_lib.cntk_stax(depth, q, jconvrfm.Padding(padding))
          e1 = jconvrfm.expand_patches(a, q, padding=padding, metric=metric)
          e2 = jconvrfm.expand_patches(b, q, padding=padding, metric=metric)
          ref = kernel_fn(e1, e2, ('nngp', 'ntk'))
          for kind in ('nngp', 'ntk'):
            got = jconvrfm.conv_ntk(a, b, depth=depth, patch_size=q, padding=padding,
                                    metric=metric, kind=kind)
            assert got.dtype == dtype and got.shape == (3, 4)
            err = tolerances.rel_fro(got, getattr(ref, kind))
            worst[dtype] = max(worst[dtype], err)
            assert err <= tol, (padding, q, c, use_metric, depth, kind, dtype, err)
  assert worst[np.float64] > 0  # the comparison is not vacuous


def test_fused_compiled_float32_matches_nt():
  rng = np.random.default_rng(7)
  x1 = _images(rng, 4, 11, 10, 3, np.float32)
  x2 = _images(rng, 3, 11, 10, 3, np.float32)
  metric = _random_psd(rng, 27, np.float32)
  for padding, kind in itertools.product(PADDINGS, ('nngp', 'ntk')):
    kw = dict(depth=3, patch_size=3, padding=padding, metric=metric, kind=kind)
    got = jconvrfm.conv_ntk(x1, x2, **kw)
    ref = jconvrfm.conv_ntk(x1, x2, impl='nt', **kw)
    assert got.dtype == jnp.float32
    tolerances.assert_rel_fro(got, ref, 1e-4, f'{padding} {kind}')


def test_x2_none_and_tiling_and_identity_metric():
  rng = np.random.default_rng(8)
  x = _images(rng, 5, 9, 9, 2)
  kw = dict(depth=2, patch_size=3, padding='SAME')
  k = jconvrfm.conv_ntk(x, **kw)
  np.testing.assert_allclose(k, k.T, rtol=1e-12)
  k_generic = jconvrfm.conv_ntk(x, x, **kw)
  off = ~np.eye(5, dtype=bool)
  tolerances.assert_rel_fro(np.asarray(k)[off], np.asarray(k_generic)[off], 1e-14, 'x2=None')
  # The diagonal comes from the exact zero-angle recursion; the generic path sits at the
  # arccos kink there and agrees to ~1e-9.
  tolerances.assert_rel_fro(np.diag(k), np.diag(k_generic), 1e-8, 'x2=None diagonal')
  # The metric path (explicit patches) with M = I equals the identity path (pixel sums).
  # (Distinct images: on K(x, x) the angle sits at the arccos kink, where rounding of 1e-16
  # in cos t moves t by 1e-8 and the two paths agree only to ~1e-9.)
  y = _images(rng, 3, 9, 9, 2)
  tolerances.assert_rel_fro(jconvrfm.conv_ntk(x, y, metric=jnp.eye(18), **kw),
                            jconvrfm.conv_ntk(x, y, **kw), 1e-12, 'M=I')
  tolerances.assert_rel_fro(jconvrfm.conv_ntk(x, metric=jnp.eye(18), **kw), k, 1e-8, 'M=I')
  # Tiled loops (with a ragged last tile) equal the one-piece computation.
  whole = fused.fused_conv_kernel(x, x[:4], None, 2, 3, jconvrfm.Padding.SAME,
                                  fused.Kind.NTK, tile=(5, 4))
  tiled = fused.fused_conv_kernel(x, x[:4], None, 2, 3, jconvrfm.Padding.SAME,
                                  fused.Kind.NTK, tile=(2, 3))
  tolerances.assert_rel_fro(tiled, whole, 1e-14, 'tiles')


def test_metric_argument_keeps_small_identities_and_drops_large_ones():
  # Small patch dimension: the metric itself, identity included (one program for all rounds).
  eye = jnp.eye(18)
  assert fused.metric_argument(eye) is eye
  # Large patch dimension: None (the cheap identity path) only for an exact identity.
  big = jnp.eye(9 * 8)
  assert fused.metric_argument(big) is None
  bent = big.at[0, 0].set(2.0)
  assert fused.metric_argument(bent) is bent
  # Either way the kernel is the same: the identity path against the metric path.
  rng = np.random.default_rng(3)
  x, y = _images(rng, 3, 6, 6, 8), _images(rng, 2, 6, 6, 8)
  kw = dict(depth=2, patch_size=3, padding='VALID')
  tolerances.assert_rel_fro(jconvrfm.conv_ntk(x, y, metric=big, **kw),
                            jconvrfm.conv_ntk(x, y, **kw), 1e-12, 'M=I, d=72')


def test_large_patch_dimension_precomputed_patches_equal_per_tile_patches(monkeypatch):
  # d = 72 > 64: under the byte bound the metric path forms every image's patches once per
  # call; with the bound at 0 it forms them in every tile. Same kernel (float64, tiled).
  rng = np.random.default_rng(4)
  x1, x2 = _images(rng, 7, 8, 8, 8), _images(rng, 5, 8, 8, 8)
  a = rng.normal(size=(72, 72))
  metric = jnp.asarray(a @ a.T / 72)
  raw = fused.fused_conv_kernel.__wrapped__

  def kernel():
    # A fresh jit each time: the byte bound is read while tracing.
    fn = jax.jit(lambda u, v, m: raw(u, v, m, 2, 3, jconvrfm.Padding.VALID, fused.Kind.NTK,
                                     tile=(3, 2)))
    return fn(x1, x2, metric)

  assert fused._precomputes_patches(7, 5, 36, 72, 8)
  once = kernel()
  monkeypatch.setattr(fused, '_MAX_PRECOMPUTED_BYTES', 0)
  assert not fused._precomputes_patches(7, 5, 36, 72, 8)
  per_tile = kernel()
  tolerances.assert_rel_fro(once, per_tile, 1e-12, 'precomputed vs per-tile patches')
  # Independent Grams: explicit patches and numpy einsums, then the public recursion.
  p1, p2 = (np.asarray(jconvrfm.patches(x, 3)) for x in (x1, x2))
  m = np.asarray(metric)
  reference = fused.conv_kernel_from_grams(
      jnp.asarray(np.einsum('ahwd,de,bhwe->abhw', p1, m, p2)),
      jnp.asarray(np.einsum('ahwd,de,ahwe->ahw', p1, m, p1)),
      jnp.asarray(np.einsum('bhwd,de,bhwe->bhw', p2, m, p2)),
      depth=2, patch_size=3, padding='VALID', channels=8)
  tolerances.assert_rel_fro(once, reference, 1e-12, 'against explicit Grams')


def test_grams_and_recursion_compose_to_conv_ntk():
  rng = np.random.default_rng(9)
  x1, x2 = _images(rng, 3, 8, 8, 2), _images(rng, 2, 8, 8, 2)
  metric = _random_psd(rng, 18)
  g12, s1, s2 = jconvrfm.patch_grams(x1, x2, patch_size=3, padding='CIRCULAR', metric=metric)
  # Brute force Grams from explicit patches.
  p1 = np.asarray(jconvrfm.patches(x1, 3, padding='CIRCULAR'))
  p2 = np.asarray(jconvrfm.patches(x2, 3, padding='CIRCULAR'))
  m = np.asarray(metric)
  np.testing.assert_allclose(g12, np.einsum('aijd,de,bije->abij', p1, m, p2), rtol=1e-12)
  np.testing.assert_allclose(s1, np.einsum('aijd,de,aije->aij', p1, m, p1), rtol=1e-12)
  np.testing.assert_allclose(s2, np.einsum('aijd,de,aije->aij', p2, m, p2), rtol=1e-12)
  k = jconvrfm.conv_kernel_from_grams(g12, s1, s2, depth=3, patch_size=3,
                                      padding='CIRCULAR', channels=2, kind='ntk')
  ref = jconvrfm.conv_ntk(x1, x2, depth=3, patch_size=3, padding='CIRCULAR', metric=metric)
  tolerances.assert_rel_fro(k, ref, 1e-13, 'grams -> kernel')


def test_stax_conv_kernel_adapter_matches_conv_ntk():
  rng = np.random.default_rng(10)
  x1, x2 = _images(rng, 3, 9, 8, 1), _images(rng, 2, 9, 8, 1)
  metric = _random_psd(rng, 9)
  _, _, kernel_fn = nt_lib.cntk_stax(2, 3, jconvrfm.Padding.SAME)
  kernel = jconvrfm.stax_conv_kernel(kernel_fn, patch_size=3, padding='SAME', kind='nngp')
  ref = jconvrfm.conv_ntk(x1, x2, depth=2, patch_size=3, padding='SAME', metric=metric,
                          kind='nngp')
  tolerances.assert_rel_fro(kernel(x1, x2, metric=metric), ref, 1e-10, 'adapter')


# ------------------------------------------------------------------------------------------
# Monte Carlo: wide finite Flax networks in NTK parameterisation.
# ------------------------------------------------------------------------------------------


class _NtkConv(nn.Module):
  """Conv in NTK parameterisation: W ~ N(0, 1), output scaled by W_std / sqrt(fan_in)."""
  features: int
  q: int
  padding: str
  w_std: float

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    kernel = self.param('kernel', nn.initializers.normal(1.0),
                        (self.q, self.q, c, self.features), x.dtype)
    if self.padding == 'CIRCULAR':
      lo, hi = (self.q - 1) // 2, self.q - 1 - (self.q - 1) // 2
      x = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)), mode='wrap')
      pad = 'VALID'
    else:
      pad = self.padding
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), pad,
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y * (self.w_std / math.sqrt(self.q * self.q * c))


class _Cnn(nn.Module):
  """The ConvRFM base CNN at finite width: depth x [conv, sqrt(2) relu], flatten, dense."""
  width: int
  depth: int
  q: int
  padding: str

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = _NtkConv(self.width, self.q, self.padding, float(self.q))(x)
      x = math.sqrt(2.0) * nn.relu(x)
    x = x.reshape(x.shape[0], -1)
    w = self.param('readout', nn.initializers.normal(1.0), (x.shape[-1], 1), x.dtype)
    return (x @ w)[:, 0] / math.sqrt(x.shape[-1])


def test_fused_matches_monte_carlo_nngp():
  rng = np.random.default_rng(11)
  x = _images(rng, 3, 6, 6, 2)
  model = _Cnn(width=256, depth=2, q=3, padding='SAME')
  keys = jax.random.split(jax.random.PRNGKey(0), 400)
  outs = jax.lax.map(lambda k: model.apply(model.init(k, x), x), keys)  # (inits, n)
  prods = outs[:, :, None] * outs[:, None, :]
  est, se = jnp.mean(prods, 0), jnp.std(prods, 0) / math.sqrt(prods.shape[0])
  k = jconvrfm.conv_ntk(x, depth=2, patch_size=3, padding='SAME', kind='nngp')
  assert bool(jnp.all(jnp.abs(est - k) <= 4 * se)), (est, k, se)
  assert float(jnp.max(se / jnp.abs(k))) < 0.15  # the check has teeth


def test_fused_matches_monte_carlo_ntk():
  rng = np.random.default_rng(12)
  x = _images(rng, 3, 7, 7, 1)
  model = _Cnn(width=128, depth=2, q=3, padding='VALID')

  def empirical_ntk(key):
    params = model.init(key, x)
    jac = jax.jacrev(lambda p: model.apply(p, x))(params)
    flat = jnp.concatenate([l.reshape(x.shape[0], -1) for l in jax.tree_util.tree_leaves(jac)],
                           axis=1)
    return flat @ flat.T

  keys = jax.random.split(jax.random.PRNGKey(1), 48)
  ntks = jax.lax.map(empirical_ntk, keys)
  est, se = jnp.mean(ntks, 0), jnp.std(ntks, 0) / math.sqrt(ntks.shape[0])
  k = jconvrfm.conv_ntk(x, depth=2, patch_size=3, padding='VALID', kind='ntk')
  assert bool(jnp.all(jnp.abs(est - k) <= 4 * se)), (est, k, se)
  assert float(jnp.max(se / jnp.abs(k))) < 0.1


# ------------------------------------------------------------------------------------------
# Gradients: central finite differences in float64.
# ------------------------------------------------------------------------------------------


def _directional_fd(f, x, v, h=1e-5):
  return (f(x + h * v) - f(x - h * v)) / (2 * h)


@pytest.mark.parametrize('padding,kind', [('VALID', 'ntk'), ('SAME', 'nngp'),
                                          ('CIRCULAR', 'ntk')])
def test_gradients_match_finite_differences(padding, kind):
  rng = np.random.default_rng(13)
  x1, x2 = _images(rng, 3, 8, 7, 2), _images(rng, 2, 8, 7, 2)
  metric = _random_psd(rng, 18)
  weights = jnp.asarray(rng.normal(size=(3, 2)))
  kw = dict(depth=3, patch_size=3, padding=padding, kind=kind)

  def loss(a, b, m):
    return jnp.sum(weights * jconvrfm.conv_ntk(a, b, metric=m, **kw))

  g1, g2, gm = jax.grad(loss, argnums=(0, 1, 2))(x1, x2, metric)
  v1, v2 = jnp.asarray(rng.normal(size=x1.shape)), jnp.asarray(rng.normal(size=x2.shape))
  e = rng.normal(size=metric.shape)
  e = jnp.asarray(e + e.T)
  fd1 = _directional_fd(lambda a: loss(a, x2, metric), x1, v1)
  fd2 = _directional_fd(lambda b: loss(x1, b, metric), x2, v2)
  fdm = _directional_fd(lambda m: loss(x1, x2, m), metric, e)
  np.testing.assert_allclose(jnp.vdot(g1, v1), fd1, rtol=1e-6)
  np.testing.assert_allclose(jnp.vdot(g2, v2), fd2, rtol=1e-6)
  np.testing.assert_allclose(jnp.vdot(gm, e), fdm, rtol=1e-6)


def test_jit_vmap_grad_compose():
  rng = np.random.default_rng(14)
  x1, x2 = _images(rng, 2, 7, 7, 1), _images(rng, 3, 7, 7, 1)
  f = functools.partial(jconvrfm.conv_ntk, depth=2, patch_size=3, padding='SAME')
  jitted = jax.jit(lambda a, b: f(a, b))(x1, x2)
  tolerances.assert_rel_fro(jitted, f(x1, x2), 1e-13, 'jit')
  per_row = jax.vmap(lambda a: f(a[None], x2)[0])(x1)
  tolerances.assert_rel_fro(per_row, f(x1, x2), 1e-13, 'vmap')
  g = jax.grad(lambda a: jnp.sum(f(a, x2)))(x1)
  assert g.shape == x1.shape and bool(jnp.all(jnp.isfinite(g)))


# ------------------------------------------------------------------------------------------
# Zero patches and images: finite values, finite gradients equal to the two-sided limit.
# ------------------------------------------------------------------------------------------


def test_zero_image_gives_zero_row_and_finite_gradients():
  rng = np.random.default_rng(15)
  x1 = _images(rng, 3, 8, 8, 1).at[1].set(0.0)
  x2 = _images(rng, 2, 8, 8, 1)
  metric = _random_psd(rng, 9)
  for kind in ('nngp', 'ntk'):
    f = lambda a, b, m, kind=kind: jconvrfm.conv_ntk(a, b, depth=3, patch_size=3,
                                                     padding='SAME', metric=m, kind=kind)
    k = f(x1, x2, metric)
    assert bool(jnp.all(jnp.isfinite(k))) and bool(jnp.all(k[1] == 0))
    grads = jax.grad(lambda a, b, m: jnp.sum(f(a, b, m)), argnums=(0, 1, 2))(x1, x2, metric)
    for g in grads:
      assert bool(jnp.all(jnp.isfinite(g)))
    # K(0, x2) == 0 for every x2, so its x2-gradient is 0: the limit of the gradients at
    # eps * x1, which scale with eps (the kernel is 1-homogeneous in each argument).
    row = lambda a, b: jnp.sum(f(a[None], b, metric))
    g_zero = jax.grad(row, argnums=1)(x1[1], x2)
    g_eps = jax.grad(row, argnums=1)(1e-9 * x1[0], x2)
    assert float(jnp.max(jnp.abs(g_zero))) == 0.0
    assert float(jnp.max(jnp.abs(g_eps))) < 1e-6


@pytest.mark.parametrize('kind', ['nngp', 'ntk'])
def test_gradient_at_zero_patches_is_the_two_sided_limit(kind):
  """Depth 1: the kernel is 1-homogeneous in each zero patch, so the gradient is defined
  as the symmetric limit `(K(x + h v) - K(x - h v)) / 2h` (exact in h for the fully zero
  patches; patches that overlap non-zero pixels are smooth, O(h^2))."""
  rng = np.random.default_rng(16)
  x1 = _images(rng, 2, 9, 9, 1).at[:, :6, :6, :].set(0.0)  # zero region: 4 x 4 zero patches
  x2 = _images(rng, 2, 9, 9, 1)
  v = jnp.zeros_like(x1).at[:, :6, :6, :].set(jnp.asarray(rng.normal(size=(2, 6, 6, 1))))
  loss = lambda a: jnp.sum(jconvrfm.conv_ntk(a, x2, depth=1, patch_size=3, kind=kind))
  g = jax.grad(loss)(x1)
  assert bool(jnp.all(jnp.isfinite(g)))
  for h in (1e-5, 1e-6):
    np.testing.assert_allclose(jnp.vdot(g, v), _directional_fd(loss, x1, v, h), rtol=1e-7)


def test_low_rank_metric_zero_patches_finite_and_correct_gradients():
  rng = np.random.default_rng(17)
  d = 9
  u = rng.normal(size=(d, 2))
  x2 = _images(rng, 2, 9, 9, 1)
  # (a) A rank-2 metric and exactly zero patches (a zero band): the metric gradient matches
  # central differences in a direction within the metric's range (M +- hE stays PSD; the
  # kernel is only defined on the PSD cone).
  x1 = _images(rng, 2, 9, 9, 1).at[:, :5, :, :].set(0.0)
  metric = jnp.asarray(u @ u.T)
  f = lambda m: jnp.sum(jconvrfm.conv_ntk(x1, x2, depth=3, patch_size=3, metric=m))
  g = jax.grad(f)(metric)
  assert bool(jnp.all(jnp.isfinite(g))) and bool(jnp.isfinite(f(metric)))
  w = rng.normal(size=(2, 2))
  e = jnp.asarray(u @ (w + w.T) @ u.T)
  np.testing.assert_allclose(jnp.vdot(g, e), _directional_fd(f, metric, e, 1e-6), rtol=1e-6)
  # (b) A metric that annihilates constant patches, and a constant band: the transformed
  # patches vanish up to rounding (p^T M p ~ +-1e-16, either sign), where the kernel is at
  # its square-root kink; values and gradients must still be finite.
  u0 = u - u.mean(axis=0)
  metric0 = jnp.asarray(u0 @ u0.T)
  x1c = x1.at[:, :5, :, :].set(0.5)
  for kind in ('nngp', 'ntk'):
    fc = lambda m, a, kind=kind: jnp.sum(
        jconvrfm.conv_ntk(a, x2, depth=3, patch_size=3, metric=m, kind=kind))
    grads = jax.grad(fc, argnums=(0, 1))(metric0, x1c)
    assert bool(jnp.isfinite(fc(metric0, x1c)))
    assert all(bool(jnp.all(jnp.isfinite(gr))) for gr in grads)


# ------------------------------------------------------------------------------------------
# Errors.
# ------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
  x = jnp.ones((2, 6, 6, 1))
  kw = dict(depth=2, patch_size=3)
  with pytest.raises(ValueError, match='x1.*rank 4'):
    jconvrfm.conv_ntk(jnp.ones((6, 6, 1)), **kw)
  with pytest.raises(ValueError, match='x1.*NaN'):
    jconvrfm.conv_ntk(x.at[0, 0, 0, 0].set(jnp.nan), **kw)
  with pytest.raises(ValueError, match='x2.*NaN'):
    jconvrfm.conv_ntk(x, x.at[0, 0, 0, 0].set(jnp.inf), **kw)
  with pytest.raises(ValueError, match='same height, width and channels'):
    jconvrfm.conv_ntk(x, jnp.ones((2, 6, 6, 3)), **kw)
  with pytest.raises(TypeError, match='same dtype'):
    jconvrfm.conv_ntk(x, x.astype(jnp.float32), **kw)
  with pytest.raises(ValueError, match='patch_size'):
    jconvrfm.conv_ntk(x, depth=1, patch_size=7)
  with pytest.raises(ValueError, match='depth'):
    jconvrfm.conv_ntk(x, depth=0, patch_size=3)
  with pytest.raises(ValueError, match='depth.*too large'):
    jconvrfm.conv_ntk(x, depth=3, patch_size=3)
  with pytest.raises(ValueError, match="kind.*'ntk', 'nngp'"):
    jconvrfm.conv_ntk(x, kind='cntk', **kw)
  with pytest.raises(ValueError, match="impl.*'fused', 'nt'"):
    jconvrfm.conv_ntk(x, impl='fast', **kw)
  with pytest.raises(ValueError, match='padding'):
    jconvrfm.conv_ntk(x, padding='REFLECT', **kw)


def test_bad_metric_raises():
  x = jnp.ones((2, 6, 6, 1))
  kw = dict(depth=2, patch_size=3)
  rng = np.random.default_rng(18)
  with pytest.raises(ValueError, match='metric.*symmetric'):
    jconvrfm.conv_ntk(x, metric=jnp.asarray(rng.normal(size=(9, 9))), **kw)
  with pytest.raises(ValueError, match='metric.*positive semi-definite'):
    jconvrfm.conv_ntk(x, metric=-jnp.eye(9), **kw)
  with pytest.raises(ValueError, match='metric.*shape \\(9, 9\\)'):
    jconvrfm.conv_ntk(x, metric=jnp.eye(4), **kw)
  with pytest.raises(ValueError, match='metric.*NaN'):
    jconvrfm.conv_ntk(x, metric=jnp.eye(9).at[0, 0].set(jnp.nan), **kw)
  with pytest.raises(TypeError, match='metric.*dtype'):
    jconvrfm.conv_ntk(x, metric=jnp.eye(9, dtype=jnp.float32), **kw)


@pytest.mark.parametrize('kind', ['nngp', 'ntk'])
def test_symmetric_diagonal_exact_in_float32(kind):
  """With x2=None the diagonal avoids the arccos kink: float32 matches float64 to 1e-6."""
  rng = np.random.default_rng(19)
  x = _images(rng, 4, 12, 12, 3)
  metric = _random_psd(rng, 27)
  kw = dict(depth=4, patch_size=3, padding='SAME', kind=kind)
  k64 = jconvrfm.conv_ntk(x, x, metric=metric, **kw)  # x2 given: generic path, float64
  k32 = jconvrfm.conv_ntk(x.astype(jnp.float32), metric=metric.astype(jnp.float32), **kw)
  np.testing.assert_allclose(np.diag(k32), np.diag(k64), rtol=2e-6)
  tolerances.assert_rel_fro(k32, k64, 1e-4, 'whole matrix')


@pytest.mark.parametrize('padding', PADDINGS)
@pytest.mark.parametrize('kind', [fused.Kind.NTK, fused.Kind.NNGP])
def test_hand_written_reverse_pass_matches_autodiff(padding, kind):
  """`kernel_and_gram_grads_internal` == reverse-mode autodiff, per pair, float64."""
  pad = jconvrfm.Padding(padding)
  rng = np.random.default_rng(11)
  x1 = jnp.asarray(rng.normal(size=(3, 9, 9, 2)))
  x2 = jnp.asarray(rng.normal(size=(4, 9, 9, 2))).at[0].set(0.0)   # a zero image
  x2 = x2.at[1].set(x1[2])                                        # a coinciding pair
  g12, g1, g2 = fused._grams_internal(x1, x2, None, 3, pad)
  for depth in (1, 3):
    def total(g12, g1r, g2r):  # self Grams replicated per pair: each pair its own copy
      out = 0.0
      for a in range(3):
        for b in range(4):
          out = out + fused._kernel_from_grams_internal(
              g12[:, :, a:a + 1, b:b + 1], g1r[:, :, a, b][:, :, None],
              g2r[:, :, a, b][:, :, None], depth, 3, pad, 2, kind)[0, 0]
      return out
    g1r = jnp.broadcast_to(g1[:, :, :, None], g12.shape)
    g2r = jnp.broadcast_to(g2[:, :, None, :], g12.shape)
    want = jax.grad(total, argnums=(0, 1, 2))(g12, g1r, g2r)
    value, *got = fused.kernel_and_gram_grads_internal(g12, g1, g2, depth, 3, pad, 2, kind)
    np.testing.assert_allclose(
        value, fused._kernel_from_grams_internal(g12, g1, g2, depth, 3, pad, 2, kind),
        rtol=1e-12)
    for name, a, b in zip(('gram12', 'sq1', 'sq2'), got, want):
      assert bool(jnp.all(jnp.isfinite(a))), name
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, err_msg=f'{name} depth {depth}')


# ------------------------------------------------------------------------------------------
# Learned metrics on many channels: patch features formed once per matrix.
# ------------------------------------------------------------------------------------------


def test_metric_factor_reproduces_the_metric():
  rng = np.random.default_rng(30)
  metric = _random_psd(rng, 72, rank=40)                  # singular: 32 zero eigenvalues
  f = fused.metric_factor(metric)
  assert f.shape == (72, 72)
  tolerances.assert_rel_fro(f @ f.T, metric, 1e-13, 'F F^T')


@pytest.mark.parametrize('dtype,eps', [(np.float64, 2.2e-16), (np.float32, 1.2e-7)])
def test_reduced_metric_factor_keeps_the_numerical_rank(dtype, eps):
  # Eigenvalues spread over 1 .. 1e-3 (rank 40), 8 below `eps lambda_max` and 24 zero: the
  # reduced factor keeps the 40 (or 48 with the 8 where they are above float64's eps),
  # rounded up to 64 columns, and reproduces the float64 metric within `eps lambda_max`
  # plus the rounding of its dtype. A full-rank metric keeps all of d.
  rng = np.random.default_rng(34)
  u, _ = np.linalg.qr(rng.normal(size=(72, 72)))
  lam = np.concatenate([np.logspace(0, -3, 40), np.full(8, 1e-9), np.zeros(24)])
  metric = (u * lam) @ u.T
  f = fused.metric_factor_reduced(jnp.asarray(metric, dtype))
  assert f.shape == (72, 64) and f.dtype == dtype
  err = np.linalg.norm(np.asarray(f, np.float64) @ np.asarray(f, np.float64).T - metric, 2)
  assert err <= 1e-9 + 50 * eps, err
  assert fused.metric_factor_reduced(_random_psd(rng, 72, dtype)).shape == (72, 72)
  # Rank 50 keeps 64 columns; rank 65 would round up to 96, past d: kept at d.
  assert fused.metric_factor_reduced(_random_psd(rng, 72, dtype, rank=50)).shape == (72, 64)
  assert fused.metric_factor_reduced(_random_psd(rng, 72, dtype, rank=65)).shape == (72, 72)


def test_metric_kernel_matrix_with_low_rank_metric_equals_explicit_patch_grams():
  # Rank 20 of d = 72: the features have 32 columns. Against explicit `p^T M p'` Grams.
  rng = np.random.default_rng(35)
  x, y = _images(rng, 21, 7, 6, 8), _images(rng, 9, 7, 6, 8)
  metric = _random_psd(rng, 72, rank=20)
  args = (2, 3, jconvrfm.Padding.SAME, fused.Kind.NTK)
  for a, b in ((x, None), (x, y)):
    g12, s1, s2 = fused.patch_grams(a, a if b is None else b, patch_size=3, padding='SAME',
                                    metric=metric)
    want = np.asarray(fused.conv_kernel_from_grams(g12, s1, s2, depth=2, patch_size=3,
                                                   padding='SAME', channels=8))
    got = fused.metric_kernel_matrix(a, b, metric, *args)
    off = ~np.eye(*want.shape, dtype=bool)
    tolerances.assert_rel_fro(got[off], want[off], 1e-12, 'low-rank metric')


@pytest.mark.parametrize('padding', PADDINGS)
@pytest.mark.parametrize('kind', ['ntk', 'nngp'])
def test_metric_kernel_matrix_equals_explicit_patch_grams(padding, kind):
  # float64 through the XLA feature tiles, against the kernel from explicit `p^T M p'` Grams
  # (the public `conv_kernel_from_grams`); column chunks of 16 images force several chunks,
  # row chunks cut at their left edge, and the symmetric matrix's upper-triangle mirroring.
  rng = np.random.default_rng(31 + len(padding) + len(kind))
  x, y = _images(rng, 41, 7, 6, 8), _images(rng, 19, 7, 6, 8)
  metric = _random_psd(rng, 72)
  pad, knd = jconvrfm.Padding(padding), fused.Kind(kind)

  def want(a, b):
    g12, s1, s2 = fused.patch_grams(a, b, patch_size=3, padding=padding, metric=metric)
    return fused.conv_kernel_from_grams(g12, s1, s2, depth=2, patch_size=3, padding=padding,
                                        channels=8, kind=kind)

  per_image = 42 * 72 * 8 if padding != 'VALID' else 20 * 72 * 8
  for feature_bytes in (fused.FEATURE_BYTES, (16 + fused._FEATURE_ROWS) * per_image):  # pylint: disable=protected-access
    done = []
    sym = fused.metric_kernel_matrix(x, None, metric, 2, 3, pad, knd,
                                     progress=lambda d, t: done.append((d, t)),
                                     feature_bytes=feature_bytes)
    assert sym.shape == (41, 41) and sym.dtype == np.float64
    np.testing.assert_array_equal(sym, sym.T)
    ref = want(x, x)
    off = ~np.eye(41, dtype=bool)
    tolerances.assert_rel_fro(sym[off], np.asarray(ref)[off], 1e-12, f'symmetric {padding}')
    # The reference's diagonal goes through the arccos kink at cos t = 1 (~1e-8 in float64).
    tolerances.assert_rel_fro(np.diag(sym), np.diag(ref), 1e-7, 'diagonal')
    assert done[-1][0] == done[-1][1] == len(done)
    rect = fused.metric_kernel_matrix(x, y, metric, 2, 3, pad, knd,
                                      feature_bytes=feature_bytes)
    tolerances.assert_rel_fro(rect, want(x, y), 1e-12, f'rectangular {padding}')
  assert len(done) > 3                                     # several column chunks


def test_whole_kernel_matrix_routes_large_learned_metrics_to_features():
  rng = np.random.default_rng(32)
  x = _images(rng, 6, 6, 6, 8)
  args = (2, 3, jconvrfm.Padding.SAME, fused.Kind.NTK)
  metric = _random_psd(rng, 72)
  got = fused.whole_kernel_matrix(x, None, metric, *args)
  np.testing.assert_array_equal(got, fused.metric_kernel_matrix(x, None, metric, *args))
  # float64 small patch dimension, or the identity past 64: no untiled path (callers tile).
  assert fused.whole_kernel_matrix(x[..., :2], None, _random_psd(rng, 18), *args) is None
  assert fused.whole_kernel_matrix(x, None, None, *args) is None


def test_self_kernel_of_large_learned_metric_equals_explicit_patches():
  # d = 72: the diagonal from chunked features against explicit `p^T M p` (float64), with
  # more images than one feature chunk holds.
  rng = np.random.default_rng(33)
  x = _images(rng, 37, 6, 7, 8)
  metric = _random_psd(rng, 72)
  got = fused.fused_self_kernel(x, metric, 3, 3, jconvrfm.Padding.SAME, fused.Kind.NTK)
  p = np.asarray(jconvrfm.patches(x, 3, padding='SAME'))
  sq = np.einsum('ahwd,de,ahwe->ahw', p, np.asarray(metric), p)
  # K(x, x) at angle 0: the linear recursion on the self Grams (independent evaluation).
  k = sq / 8.0
  theta = k
  for _ in range(2):
    theta = _box_sum(theta + k)
    k = _box_sum(k)
  want = np.mean(theta + k, axis=(1, 2))
  tolerances.assert_rel_fro(got, want, 1e-13, 'self kernel d=72')


@pytest.mark.parametrize('padding', PADDINGS)
@pytest.mark.parametrize('with_factor', [False, True])
def test_position_major_features_equal_explicit_patches(padding, with_factor):
  # 37 images: three 16-image chunks, the last padded. Against numpy on the public patches.
  rng = np.random.default_rng(36)
  x = _images(rng, 37, 6, 7, 8)
  factor = jnp.asarray(rng.normal(size=(72, 40))) if with_factor else None
  t, t_sq = fused.metric_features_position_major(x, factor, q=3,
                                                 padding=jconvrfm.Padding(padding))
  p = np.asarray(jconvrfm.patches(x, 3, padding=padding))
  want = p if factor is None else p @ np.asarray(factor)
  want = np.transpose(want, (1, 2, 0, 3))
  assert t.shape == want.shape and t_sq.shape == want.shape[:3]
  np.testing.assert_allclose(t, want, rtol=1e-13, atol=1e-13)
  np.testing.assert_allclose(t_sq, np.sum(want * want, axis=-1), rtol=1e-13)


def _box_sum(a):
  """3 x 3 window sum with zero (SAME) padding over axes 1, 2 of `(n, H, W)`, in numpy."""
  p = np.pad(a, ((0, 0), (1, 1), (1, 1)))
  return sum(p[:, i:i + a.shape[1], j:j + a.shape[2]] for i in range(3) for j in range(3))
