"""Tests for `jconvrfm.patches`: brute force, the convolution identity, transforms, errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jconvrfm
from jconvrfm._src import patches as patches_lib
from tests import tolerances


def brute_force_patches(x, q, stride, padding):
  """Python loop over positions and offsets, from the definition (float64 numpy)."""
  x = np.asarray(x, dtype=np.float64)
  n, h, w, c = x.shape
  if padding == 'VALID':
    out_h, out_w, top, left = (h - q) // stride + 1, (w - q) // stride + 1, 0, 0
  else:
    out_h, out_w = -(-h // stride), -(-w // stride)
    top = max((out_h - 1) * stride + q - h, 0) // 2
    left = max((out_w - 1) * stride + q - w, 0) // 2
  out = np.zeros((n, out_h, out_w, q * q * c))
  for a, i, j, u, v, ch in itertools.product(
      range(n), range(out_h), range(out_w), range(q), range(q), range(c)):
    r, s = i * stride + u - top, j * stride + v - left
    if padding == 'CIRCULAR':
      val = x[a, r % h, s % w, ch]
    elif 0 <= r < h and 0 <= s < w:
      val = x[a, r, s, ch]
    else:
      val = 0.0
    out[a, i, j, (u * q + v) * c + ch] = val
  return out


@pytest.mark.parametrize('padding', ['VALID', 'SAME', 'CIRCULAR'])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('q', [1, 3, 5])
@pytest.mark.parametrize('c', [1, 3])
def test_matches_brute_force(padding, stride, q, c):
  rng = np.random.default_rng(q * 100 + c * 10 + stride)
  x = rng.normal(size=(2, 7, 6, c))
  got = jconvrfm.patches(jnp.asarray(x), q, stride=stride, padding=padding)
  want = brute_force_patches(x, q, stride, padding)
  assert got.shape == want.shape
  np.testing.assert_array_equal(np.asarray(got), want)
  assert got.shape[1:3] == patches_lib.output_shape(7, 6, q, stride, padding)


@pytest.mark.parametrize('padding', ['VALID', 'SAME'])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('q', [1, 2, 3, 4])
def test_convolution_identity(padding, stride, q):
  """patches(x) @ W.reshape(d, k) == lax conv with the Flax (HWIO) kernel, SAME/VALID."""
  rng = np.random.default_rng(7)
  c, k = 3, 4
  x = jnp.asarray(rng.normal(size=(2, 9, 8, c)))
  kernel = jnp.asarray(rng.normal(size=(q, q, c, k)))
  got = jconvrfm.patches(x, q, stride=stride, padding=padding) @ kernel.reshape(-1, k)
  want = jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST)
  tolerances.assert_rel_fro(got, want, 1e-12, 'patch matmul vs lax conv')


@pytest.mark.parametrize('q', [2, 3])
def test_circular_is_conv_of_wrapped_image(q):
  """CIRCULAR == VALID conv of the image tiled 3 x 3, cropped to SAME's window."""
  rng = np.random.default_rng(3)
  h, w, c, k = 5, 6, 2, 3
  x = rng.normal(size=(1, h, w, c))
  kernel = rng.normal(size=(q, q, c, k))
  total = q - 1
  top, left = total // 2, total // 2
  tiled = np.tile(x, (1, 3, 3, 1))[:, h - top:2 * h + total - top, w - left:2 * w + total - left]
  want = jax.lax.conv_general_dilated(
      jnp.asarray(tiled), jnp.asarray(kernel), (1, 1), 'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=jax.lax.Precision.HIGHEST)
  got = jconvrfm.patches(jnp.asarray(x), q, padding='circular') @ kernel.reshape(-1, k)
  tolerances.assert_rel_fro(got, want, 1e-12, 'circular patches vs tiled conv')


def test_keeps_dtype_and_accepts_enum():
  x = jnp.ones((1, 4, 4, 2), dtype=jnp.float32)
  assert jconvrfm.patches(x, 3).dtype == jnp.float32
  assert jconvrfm.patches(x.astype(jnp.bfloat16), 3).dtype == jnp.bfloat16
  assert jconvrfm.patches(x, 3, padding=jconvrfm.Padding.SAME).shape == (1, 4, 4, 18)


def test_jit_vmap_grad():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 2, 6, 6, 2)))
  # vmap over an extra leading axis equals the loop.
  got = jax.vmap(lambda z: jconvrfm.patches(z, 3, padding='SAME'))(x)
  for b in range(3):
    np.testing.assert_array_equal(got[b], jconvrfm.patches(x[b], 3, padding='SAME'))
  # jit of a composition.
  f = jax.jit(lambda z: jnp.sum(jconvrfm.patches(z, 3, stride=2, padding='CIRCULAR') ** 2))
  assert np.isfinite(f(x[0]))
  # grad: d/dx sum(patches) counts how many patches contain each pixel (VALID, stride 1).
  g = jax.grad(lambda z: jnp.sum(jconvrfm.patches(z, 3)))(x[0])
  counts = np.zeros((6, 6))
  for i, j in itertools.product(range(4), range(4)):
    counts[i:i + 3, j:j + 3] += 1
  np.testing.assert_array_equal(g[0, :, :, 0], counts)


def test_no_recompile_on_second_call():
  x = jnp.ones((2, 5, 5, 1))
  jconvrfm.patches(x, 3)
  before = patches_lib._patches._cache_size()
  jconvrfm.patches(x + 1, 3)
  assert patches_lib._patches._cache_size() == before


@pytest.mark.parametrize('x, kwargs, error, match', [
    (np.ones((4, 4, 1)), {}, ValueError, 'rank 4'),
    (np.full((1, 4, 4, 1), np.nan), {}, ValueError, 'NaN'),
    (np.full((1, 4, 4, 1), np.inf), {}, ValueError, 'NaN or Inf'),
    (np.ones((1, 2, 4, 1)), {}, ValueError, 'patch_size'),
    (np.ones((0, 4, 4, 1)), {}, ValueError, 'empty'),
    (np.ones((1, 4, 4, 1)), {'stride': 0}, ValueError, 'stride'),
    (np.ones((1, 4, 4, 1)), {'stride': 1.5}, TypeError, 'stride'),
    (np.ones((1, 4, 4, 1)), {'padding': 'REFLECT'}, ValueError, 'padding'),
])
def test_errors(x, kwargs, error, match):
  with pytest.raises(error, match=match):
    jconvrfm.patches(x, 3, **kwargs)


def test_bad_patch_size():
  with pytest.raises(ValueError, match='patch_size'):
    jconvrfm.patches(np.ones((1, 4, 4, 1)), 0)
  with pytest.raises(TypeError, match='patch_size'):
    jconvrfm.patches(np.ones((1, 4, 4, 1)), (3, 3))


@pytest.mark.parametrize('padding', ['SAME', 'CIRCULAR'])
def test_padding_allows_patch_larger_than_image(padding):
  x = np.random.default_rng(1).normal(size=(1, 2, 3, 1))
  got = jconvrfm.patches(jnp.asarray(x), 5, padding=padding)
  np.testing.assert_array_equal(got, brute_force_patches(x, 5, 1, padding))


@pytest.mark.parametrize('padding,stride,q', [('VALID', 1, 11), ('SAME', 2, 4),
                                              ('CIRCULAR', 3, 5)])
def test_gather_forward_and_slice_derivatives_agree(padding, stride, q):
  # `_patches` evaluates by one gather and differentiates through strided slices: both must
  # give exactly the same patches, and every derivative must be that of the slices.
  rng = np.random.default_rng(q)
  x = jnp.asarray(rng.normal(size=(2, 13, 12, 3)))
  pad = patches_lib.checks.canonical_padding(padding)
  by_slices = patches_lib._patches_by_slices(x, q, stride, pad)
  np.testing.assert_array_equal(patches_lib._patches(x, q, stride, pad), by_slices)
  np.testing.assert_array_equal(patches_lib._patches_by_gather(x, q, stride, pad), by_slices)
  w = jnp.asarray(rng.normal(size=by_slices.shape))
  loss = lambda fn: (lambda x: jnp.sum(w * jnp.sin(fn(x, q, stride, pad))))
  tolerances.assert_rel_fro(jax.grad(loss(patches_lib._patches))(x),
                            jax.grad(loss(patches_lib._patches_by_slices))(x), 1e-14, 'grad')
  _, tangent = jax.jvp(lambda x: patches_lib._patches(x, q, stride, pad), (x,), (x,))
  np.testing.assert_array_equal(tangent, by_slices)
