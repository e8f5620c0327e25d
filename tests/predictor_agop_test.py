"""Tests for jconvrfm._src.predictor_agop (patch AGOP of a kernel predictor)."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jconvrfm._src import patches as patches_lib
from jconvrfm._src import predictor_agop as pa
from tests import tolerances


def toy_from_grams(gram, sq1, sq2):
  """A nonlinear kernel of the Grams that mixes positions (smooth at zero patches)."""
  dist = sq1[:, None] + sq2[None, :] - 2 * gram
  k1 = jnp.exp(-dist / 4.0)
  mixed = k1 * (1.0 + 0.5 * jnp.roll(gram, 1, axis=2)) * jnp.tanh(gram + 0.1)
  return jnp.sum(mixed, axis=(2, 3)) + 0.3 * jnp.sum(k1 * jnp.roll(k1, 1, axis=3), axis=(2, 3))


def brute_force_agop(kernel_from_grams, x, alpha, z, q, padding, metric, z_indices=None):
  """Per-class `jax.grad` of f_c w.r.t. an explicit patch tensor of each z, float64.

  With `z_indices` (z = x[z_indices]) the Gram entry of each pair (x_i, x_i) is set to the
  squared norm in value only (`stop_gradient` of the difference), as the fast path does.
  """
  px = patches_lib.patches(x, q, padding=padding)
  pz_all = patches_lib.patches(z, q, padding=padding)
  mpx = px @ metric
  sqx = jnp.sum(mpx * px, -1)

  def f(pz, c, own):
    gram = jnp.einsum('mhwd,hwd->mhw', mpx, pz)
    sqz = jnp.sum((pz @ metric) * pz, -1)
    if own is not None:
      gram = gram.at[own].add(jax.lax.stop_gradient(sqx[own] - gram[own]))
    return alpha[:, c] @ kernel_from_grams(gram[:, None], sqx, sqz[None])[:, 0]

  d = px.shape[-1]
  g = np.zeros((d, d))
  for b, pz in enumerate(pz_all):
    own = None if z_indices is None else int(z_indices[b])
    for c in range(alpha.shape[1]):
      grad = np.asarray(jax.grad(f)(pz, c, own)).reshape(-1, d)
      g += grad.T @ grad
  return g / z.shape[0]


def _problem(seed, n=5, s=3, size=6, channels=2, classes=3, q=3, with_metric=True,
             rank=None):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.uniform(size=(n, size, size, channels)))
  z = jnp.asarray(rng.uniform(size=(s, size, size, channels)))
  alpha = jnp.asarray(rng.normal(size=(n, classes)))
  d = q * q * channels
  if with_metric:
    f = rng.normal(size=(d, rank or d))
    metric = jnp.asarray(f @ f.T / d)
  else:
    metric = jnp.eye(d)
  return x, alpha, z, metric


@pytest.mark.parametrize('padding', ['VALID', 'SAME'])
@pytest.mark.parametrize('with_metric', [False, True])
def test_fused_matches_brute_force(padding, with_metric):
  x, alpha, z, metric = _problem(0, with_metric=with_metric)
  want = brute_force_agop(toy_from_grams, x, alpha, z, 3, padding, metric)
  got = pa.predictor_agop_from_grams(
      toy_from_grams, x, alpha, z, patch_size=3, padding=padding,
      metric=metric if with_metric else None)
  assert got.dtype == jnp.float64 and got.shape == (18, 18)
  tolerances.assert_rel_fro(got, want, 1e-6, f'fused {padding}')


@pytest.mark.parametrize('padding', ['VALID', 'SAME'])
@pytest.mark.parametrize('with_metric', [False, True])
def test_autodiff_matches_brute_force(padding, with_metric):
  x, alpha, z, metric = _problem(1, with_metric=with_metric)
  want = brute_force_agop(toy_from_grams, x, alpha, z, 3, padding, metric)
  got = pa.predictor_agop_autodiff(
      pa.GramKernelOnPatches(toy_from_grams), x, alpha, z, patch_size=3, padding=padding,
      metric=metric if with_metric else None)
  tolerances.assert_rel_fro(got, want, 1e-6, f'autodiff {padding}')


def relu_ntk_from_grams(gram, sq1, sq2):
  """A depth-2 ReLU-NTK-like kernel, with the NTK's kink at coinciding patches."""
  from jconvrfm._src.kernels import fused  # pylint: disable=g-import-not-at-top
  return fused.conv_kernel_from_grams(gram, sq1, sq2, depth=2, patch_size=3, channels=2)


@pytest.mark.parametrize('kernel', [toy_from_grams, relu_ntk_from_grams])
def test_samples_from_training_set_match_brute_force(kernel):
  x, alpha, _, metric = _problem(6, n=6)
  idx = np.array([4, 1, 5])
  want = brute_force_agop(kernel, x, alpha, x[idx], 3, 'VALID', metric, idx)
  got = pa.predictor_agop_from_grams(kernel, x, alpha, z_indices=idx, patch_size=3,
                                     metric=metric, train_block=4, z_block=2)
  tolerances.assert_rel_fro(got, want, 1e-6, 'z_indices')
  got_ad = pa.predictor_agop_autodiff(pa.GramKernelOnPatches(kernel), x, alpha, z_indices=idx,
                                      patch_size=3, metric=metric)
  assert got_ad.shape == got.shape
  with pytest.raises(ValueError, match='exactly one'):
    pa.predictor_agop_from_grams(kernel, x, alpha, x, z_indices=idx, patch_size=3)
  with pytest.raises(ValueError, match='z_indices'):
    pa.predictor_agop_from_grams(kernel, x, alpha, z_indices=np.array([6]), patch_size=3)


def test_chunking_does_not_change_result():
  x, alpha, z, metric = _problem(2, n=7, s=5)
  whole = pa.predictor_agop_from_grams(toy_from_grams, x, alpha, z, patch_size=3, metric=metric)
  seen = []
  chunked = pa.predictor_agop_from_grams(
      toy_from_grams, x, alpha, z, patch_size=3, metric=metric, train_block=3, z_block=2,
      progress=seen.append)
  assert seen == [2, 2, 1]
  tolerances.assert_rel_fro(chunked, whole, 1e-12, 'chunked')
  chunked_ad = pa.predictor_agop_autodiff(
      pa.GramKernelOnPatches(toy_from_grams), x, alpha, z, patch_size=3, metric=metric,
      train_block=4, z_block=3)
  tolerances.assert_rel_fro(chunked_ad, whole, 1e-10, 'autodiff chunked')


def test_float32_keeps_dtype():
  x, alpha, z, metric = _problem(3)
  got = pa.predictor_agop_from_grams(
      toy_from_grams, x.astype(jnp.float32), alpha, z, patch_size=3,
      metric=metric.astype(jnp.float32))
  assert got.dtype == jnp.float32
  want = pa.predictor_agop_from_grams(toy_from_grams, x, alpha, z, patch_size=3, metric=metric)
  tolerances.assert_rel_fro(got, want, 1e-4, 'float32')


def test_nan_gradient_raises():
  def singular(gram, sq1, sq2):  # sqrt has an infinite derivative at a zero patch
    return jnp.sum(jnp.sqrt(sq2)[None] * gram, axis=(2, 3))

  x, alpha, _, _ = _problem(4)
  z = jnp.zeros((1,) + x.shape[1:])
  with pytest.raises(ValueError, match='NaN or Inf gradients'):
    pa.predictor_agop_from_grams(singular, x, alpha, z, patch_size=3)


@pytest.mark.parametrize('kwargs,match', [
    (dict(alpha=np.ones((4, 2))), 'one row per training image'),
    (dict(z=np.ones((2, 5, 5, 2))), 'shape of the training images'),
    (dict(metric=-np.eye(18)), 'positive semi-definite'),
    (dict(metric=np.eye(9)), 'patch dimension'),
    (dict(padding='FULL'), 'padding'),
])
def test_bad_input(kwargs, match):
  x, alpha, z, _ = _problem(5)
  args = dict(x_train=x, alpha=alpha, z=z, patch_size=3)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    pa.predictor_agop_from_grams(toy_from_grams, **args)


def test_docstring_examples():
  failures, _ = doctest.testmod(pa)
  assert failures == 0


# The fused CNTK brings a hand-written reverse pass (`GramConvKernel.grads_spatial_leading`):
# the fast path then skips autodiff and lays blocks out (positions, samples, train).


@pytest.mark.parametrize('padding,kind', [('VALID', 'ntk'), ('SAME', 'nngp'),
                                          ('CIRCULAR', 'ntk'), ('SAME', 'ntk')])
@pytest.mark.parametrize('with_metric', [False, True])
def test_hand_written_cntk_path_matches_brute_force(padding, kind, with_metric):
  from jconvrfm._src import checks  # pylint: disable=g-import-not-at-top
  from jconvrfm._src.kernels import fused  # pylint: disable=g-import-not-at-top
  x, alpha, z, metric = _problem(7, n=5, s=3, size=7, with_metric=with_metric)
  kernel = fused.GramConvKernel(2, 3, checks.canonical_padding(padding), 2,
                                fused.canonical_kind(kind))
  plain = lambda g, s1, s2: kernel(g, s1, s2)   # same function, autodiff only
  want = brute_force_agop(plain, x, alpha, z, 3, padding, metric)
  got = pa.predictor_agop_from_grams(kernel, x, alpha, z, patch_size=3, padding=padding,
                                     metric=metric if with_metric else None,
                                     train_block=2, z_block=2)
  tolerances.assert_rel_fro(got, want, 1e-6, f'hand-written {padding} {kind}')
  # Training images as samples: coinciding pairs take the kernel's own convention.
  idx = np.array([3, 0, 4])
  want = brute_force_agop(plain, x, alpha, x[idx], 3, padding, metric, idx)
  got = pa.predictor_agop_from_grams(kernel, x, alpha, z_indices=idx, patch_size=3,
                                     padding=padding, metric=metric)
  tolerances.assert_rel_fro(got, want, 1e-6, f'hand-written z_indices {padding} {kind}')


def test_hand_written_cntk_path_blocks_do_not_change_result():
  from jconvrfm._src import checks  # pylint: disable=g-import-not-at-top
  from jconvrfm._src.kernels import fused  # pylint: disable=g-import-not-at-top
  x, alpha, z, metric = _problem(8, n=7, s=5, size=7)
  kernel = fused.GramConvKernel(2, 3, checks.Padding.VALID, 2)
  whole = pa.predictor_agop_from_grams(kernel, x, alpha, z, patch_size=3, metric=metric)
  seen = []
  chunked = pa.predictor_agop_from_grams(kernel, x, alpha, z, patch_size=3, metric=metric,
                                         train_block=3, z_block=2, progress=seen.append)
  assert seen == [2, 2, 1]
  tolerances.assert_rel_fro(chunked, whole, 1e-12, 'hand-written chunked')
  generic = pa.predictor_agop_from_grams(lambda g, s1, s2: kernel(g, s1, s2), x, alpha, z,
                                         patch_size=3, metric=metric)
  tolerances.assert_rel_fro(generic, whole, 1e-10, 'hand-written vs autodiff fast path')


@pytest.mark.parametrize('padding', ['VALID', 'SAME'])
def test_symmetric_path_matches_one_directional_and_brute_force(padding):
  """All training images as samples: each unordered pair once == every ordered pair."""
  from jconvrfm._src import checks  # pylint: disable=g-import-not-at-top
  from jconvrfm._src.kernels import fused  # pylint: disable=g-import-not-at-top
  x, alpha, _, metric = _problem(9, n=7, size=7)
  kernel = fused.GramConvKernel(2, 3, checks.canonical_padding(padding), 2)
  idx = np.array([3, 0, 6, 1, 5, 2, 4])   # a permutation of range(7)
  seen = []
  sym = pa.predictor_agop_from_grams(kernel, x, alpha, z_indices=idx, patch_size=3,
                                     padding=padding, metric=metric, train_block=3,
                                     progress=seen.append)
  assert sum(seen) == 7
  one = pa.predictor_agop_from_grams(kernel, x, alpha, z_indices=idx, patch_size=3,
                                     padding=padding, metric=metric, symmetric=False)
  # The two paths form each Gram entry with M on opposite sides (different rounding, ~1e-16);
  # the ReLU map's derivative 1 / sin t amplifies that near coinciding patches, to ~1e-10.
  tolerances.assert_rel_fro(sym, one, 1e-8, f'symmetric vs one-directional {padding}')
  plain = lambda g, s1, s2: kernel(g, s1, s2)
  want = brute_force_agop(plain, x, alpha, x[idx], 3, padding, metric, idx)
  tolerances.assert_rel_fro(sym, want, 1e-6, f'symmetric vs brute force {padding}')


@pytest.mark.parametrize('symmetric', [True, False])
def test_blocks_spread_over_devices_give_the_one_device_result(symmetric):
  """Block pairs / sample blocks on 1, 2 or 4 (simulated) devices: same AGOP to rounding."""
  from jconvrfm._src import checks  # pylint: disable=g-import-not-at-top
  from jconvrfm._src.kernels import fused  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  if len(devices) < 2:
    pytest.skip('needs several (simulated) devices; see conftest.py')
  x, alpha, _, metric = _problem(10, n=9, size=7)
  kernel = fused.GramConvKernel(2, 3, checks.Padding.SAME, 2)
  idx = np.arange(9)
  run = lambda devs: pa.predictor_agop_from_grams(
      kernel, x, alpha, z_indices=idx, patch_size=3, padding='SAME', metric=metric,
      train_block=3, z_block=2, symmetric=symmetric, devices=devs)
  one = run(devices[:1])
  for count in sorted({2, len(devices)}):
    got = run(devices[:count])
    assert got.devices() == {devices[0]}
    # Devices only regroup the sums over blocks. They are ill-conditioned here (`v = u + 2 coef
    # p` cancels): the same block pairs summed in reverse order on ONE device move this AGOP
    # by 9.4e-12 in float64, so 1e-10 is rounding, while a lost or doubled block is O(1).
    tolerances.assert_rel_fro(got, one, 1e-10, f'{count} devices, symmetric={symmetric}')
  want = brute_force_agop(lambda g, s1, s2: kernel(g, s1, s2), x, alpha, x, 3, 'SAME', metric,
                          idx)
  tolerances.assert_rel_fro(one, want, 1e-6, 'one device vs brute force')


def test_bad_devices_are_rejected():
  x, alpha, z, metric = _problem(11, n=3, s=2, size=5)
  kernel = lambda g, s1, s2: jnp.sum(g, axis=(2, 3))
  with pytest.raises(TypeError, match='`devices`'):
    pa.predictor_agop_from_grams(kernel, x, alpha, z, patch_size=3, devices=['cpu:0'])
  with pytest.raises(ValueError, match='must not repeat'):
    pa.predictor_agop_from_grams(kernel, x, alpha, z, patch_size=3,
                                 devices=jax.devices()[:1] * 2)


@pytest.mark.parametrize('n', [1, 50, 128, 129, 200, 250, 800, 832, 1000, 2000, 4001])
def test_symmetric_default_block_is_aligned_and_pads_little(n):
  b = pa._symmetric_block(n)  # pylint: disable=protected-access
  if n <= 128:
    assert b == n
    return
  nb = -(-n // b)
  assert 128 <= b <= 224 and b % 16 == 0
  assert nb * b - n < 16 * nb        # padding: less than one SIMD row per block
  # No aligned side in range gives less padded work (diagonal blocks weigh 0.6).
  work = lambda side: (0.6 * -(-n // side) + (-(-n // side)) * (-(-n // side) - 1) / 2) * side**2
  assert all(work(b) <= work(side) for side in range(128, 225, 16))
  if n == 800:
    assert b == 160   # the README run's 800 fit images: 5 blocks, no padding


# Patch dimensions past `FEATURE_MIN_DIM` (Deep ConvRFM layers on many feature maps): the
# hand-written path works on patch features `F^T p` (`F F^T = M`) with no class-weighted
# copies of the training patches.


@pytest.mark.parametrize('padding,kind', [('VALID', 'ntk'), ('SAME', 'nngp'),
                                          ('CIRCULAR', 'ntk')])
@pytest.mark.parametrize('with_metric', [False, True])
def test_feature_path_matches_brute_force(padding, kind, with_metric):
  from jconvrfm._src import checks  # pylint: disable=g-import-not-at-top
  from jconvrfm._src.kernels import fused  # pylint: disable=g-import-not-at-top
  x, alpha, z, metric = _problem(10, n=6, s=3, size=6, channels=8, with_metric=with_metric)
  assert metric.shape[0] > pa.FEATURE_MIN_DIM
  kernel = fused.GramConvKernel(2, 3, checks.canonical_padding(padding), 8,
                                fused.canonical_kind(kind))
  plain = lambda g, s1, s2: kernel(g, s1, s2)   # same function, autodiff only
  want = brute_force_agop(plain, x, alpha, z, 3, padding, metric)
  got = pa.predictor_agop_from_grams(kernel, x, alpha, z, patch_size=3, padding=padding,
                                     metric=metric if with_metric else None)
  tolerances.assert_rel_fro(got, want, 1e-6, f'features {padding} {kind}')
  idx = np.array([3, 0, 5, 1])
  want = brute_force_agop(plain, x, alpha, x[idx], 3, padding, metric, idx)
  got = pa.predictor_agop_from_grams(kernel, x, alpha, z_indices=idx, patch_size=3,
                                     padding=padding, metric=metric, train_block=4, z_block=3)
  tolerances.assert_rel_fro(got, want, 1e-6, f'features z_indices {padding} {kind}')


@pytest.mark.parametrize('dtype', [np.float64, np.float32])
def test_feature_path_with_low_rank_metric_matches_brute_force(dtype):
  # A rank-20 metric of d = 72: the features path keeps 32 columns of `F`
  # (`fused.metric_factor_reduced`), every contraction and outer sum in that width. Against
  # the float64 brute force on the full metric; float32 within its rounding.
  from jconvrfm._src import checks  # pylint: disable=g-import-not-at-top
  from jconvrfm._src.kernels import fused  # pylint: disable=g-import-not-at-top
  x, alpha, z, metric = _problem(12, n=7, s=4, size=6, channels=8, rank=20)
  assert fused.metric_factor_reduced(metric).shape == (72, 32)
  kernel = fused.GramConvKernel(2, 3, checks.Padding.SAME, 8)
  want = brute_force_agop(lambda g, s1, s2: kernel(g, s1, s2), x, alpha, z, 3, 'SAME', metric)
  cast = lambda a: jnp.asarray(a, dtype)
  got = pa.predictor_agop_from_grams(kernel, cast(x), cast(alpha), cast(z), patch_size=3,
                                     padding='SAME', metric=cast(metric), train_block=4,
                                     z_block=3)
  assert got.dtype == dtype and got.shape == (72, 72)
  tolerances.assert_rel_fro(got, want, 1e-6 if dtype == np.float64 else 1e-4, 'low rank')


def test_feature_path_blocks_and_devices_do_not_change_result():
  from jconvrfm._src import checks  # pylint: disable=g-import-not-at-top
  from jconvrfm._src.kernels import fused  # pylint: disable=g-import-not-at-top
  x, alpha, z, metric = _problem(11, n=9, s=5, size=6, channels=8)
  kernel = fused.GramConvKernel(2, 3, checks.Padding.SAME, 8)
  whole = pa.predictor_agop_from_grams(kernel, x, alpha, z, patch_size=3, padding='SAME',
                                       metric=metric)
  seen = []
  chunked = pa.predictor_agop_from_grams(kernel, x, alpha, z, patch_size=3, padding='SAME',
                                         metric=metric, train_block=4, z_block=2,
                                         progress=seen.append)
  assert seen == [2, 2, 1]
  tolerances.assert_rel_fro(chunked, whole, 1e-12, 'features chunked')
  # Sample blocks spread over the (simulated, conftest.py) devices, one sample a block.
  devices = jax.devices()
  spread = pa.predictor_agop_from_grams(kernel, x, alpha, z, patch_size=3, padding='SAME',
                                        metric=metric, z_block=1, devices=devices)
  assert spread.devices() == {devices[0]}
  tolerances.assert_rel_fro(spread, whole, 1e-10, f'features on {len(devices)} devices')
  # The patch-based path (forced by raising the bound) agrees: an independent contraction.
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pa, 'FEATURE_MIN_DIM', 10**6)
    patches_path = pa.predictor_agop_from_grams(kernel, x, alpha, z, patch_size=3,
                                                padding='SAME', metric=metric)
  tolerances.assert_rel_fro(whole, patches_path, 1e-12, 'features vs patches path')
