"""Tests for the patch AGOP: generic autodiff form vs closed form vs explicit formulas.

The test network is a 3-conv-layer tanh net in plain JAX, written with `lax.conv_general_dilated`
(independently of `jconvrfm.patches`), float64:

  x (n, 8, 8, 2)
  -> conv 3x3, 2->4, stride 1, SAME      -> (8, 8, 4)   [first layer, zero padding]
  -> conv 3x3, 4->5, stride 2, VALID     -> (3, 3, 5)   [inner, strided]
  -> conv 2x2, 5->3, stride 1, CIRCULAR  -> (3, 3, 3)   [inner, periodic padding]
  -> flatten -> dense to 3 logits.

The closed form gets the pre-activation gradients by differentiating w.r.t. an additive
perturbation of each layer's conv output; the generic form differentiates a function of the
layer's explicit input patch tensor.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jconvrfm
from jconvrfm._src import agop as agop_lib
from tests import tolerances

# (q, c_in, c_out, stride, padding)
LAYERS = ((3, 2, 4, 1, 'SAME'), (3, 4, 5, 2, 'VALID'), (2, 5, 3, 1, 'CIRCULAR'))
NUM_OUTPUTS = 3
N = 5
OPTIONS = [dict(centered=c, power=p, reduce_positions=r)
           for c in (False, True) for p in (1.0, 0.5) for r in ('sum', 'mean')]


def init_params(seed=0, dtype=jnp.float64):
  rng = np.random.default_rng(seed)
  convs = []
  for q, c_in, c_out, _, _ in LAYERS:
    w = rng.normal(size=(q, q, c_in, c_out)) / np.sqrt(q * q * c_in)
    b = 0.1 * rng.normal(size=(c_out,))
    convs.append((jnp.asarray(w, dtype), jnp.asarray(b, dtype)))
  dense = rng.normal(size=(3 * 3 * 3, NUM_OUTPUTS)) / np.sqrt(27)
  return {'convs': convs, 'dense': jnp.asarray(dense, dtype)}


def conv(h, w, stride, padding):
  """Single-example conv (H, W, C) with lax; CIRCULAR (stride 1) = wrap-pad then VALID."""
  if padding == 'CIRCULAR':
    q = w.shape[0]
    lo, hi = (q - 1) // 2, q - 1 - (q - 1) // 2
    h = jnp.pad(h, ((lo, hi), (lo, hi), (0, 0)), mode='wrap')
    padding = 'VALID'
  return jax.lax.conv_general_dilated(
      h[None], w, (stride, stride), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST)[0]


def run_layers(h, params, start, stop, perturb=None):
  """Layers [start, stop) on one example; `perturb[l]` is added to conv output l."""
  for l in range(start, stop):
    w, b = params['convs'][l]
    z = conv(h, w, LAYERS[l][3], LAYERS[l][4])
    if perturb is not None and l in perturb:
      z = z + perturb[l]
    h = jnp.tanh(z + b)
  return h


def head(h, params):
  return h.reshape(-1) @ params['dense']


def network(x, params, perturb=None):
  return head(run_layers(x, params, 0, len(LAYERS), perturb), params)


def layer_input(x, params, layer):
  """Input of conv `layer` for a batch (n, H, W, C)."""
  return jax.vmap(lambda xi: run_layers(xi, params, 0, layer))(x)


def suffix_fn(layer, patches_one, params):
  """Network outputs as a function of conv `layer`'s explicit input patches (H', W', d)."""
  w, b = params['convs'][layer]
  z = patches_one @ w.reshape(-1, w.shape[-1])
  h = jnp.tanh(z + b)
  return head(run_layers(h, params, layer + 1, len(LAYERS)), params)


def preact_grads(x, params, layer):
  """(n, outputs, H', W', k) gradients w.r.t. conv `layer`'s output (before bias)."""
  out_shape = jax.eval_shape(lambda xi: run_layers(xi, params, 0, layer + 1), x[0]).shape

  def one(xi):
    return jax.jacrev(lambda e: network(xi, params, {layer: e}))(jnp.zeros(out_shape, x.dtype))

  return jax.vmap(one)(x)


def layer_patches(x, params, layer):
  q, _, _, stride, padding = LAYERS[layer]
  return jconvrfm.patches(layer_input(x, params, layer), q, stride=stride, padding=padding)


def explicit_agop(fn, patch_tensor, *args, centered=False):
  """Float64 numpy formula from per-example Jacobians, one example at a time."""
  jacs = np.stack([
      np.asarray(jax.jacrev(lambda p: jnp.reshape(fn(p, *args), (-1,)))(patch_tensor[i]),
                 np.float64) for i in range(patch_tensor.shape[0])])  # (n, k, H', W', d)
  d = jacs.shape[-1]
  if centered:
    jacs = jacs - jacs.mean(axis=0, keepdims=True)
  flat = jacs.reshape(jacs.shape[0], -1, d)
  return np.einsum('npd,npe->de', flat, flat) / jacs.shape[0]


@pytest.fixture(scope='module')
def setup():
  params = init_params()
  x = jnp.asarray(np.random.default_rng(1).normal(size=(N, 8, 8, 2)))
  return x, params


@pytest.mark.parametrize('layer', [0, 1, 2])
def test_generic_equals_closed_form_for_every_option(setup, layer):
  x, params = setup
  p = layer_patches(x, params, layer)
  deltas = preact_grads(x, params, layer)
  assert deltas.shape[:2] == (N, NUM_OUTPUTS) and deltas.shape[2:4] == p.shape[1:3]
  fn = functools.partial(suffix_fn, layer)
  kernel = params['convs'][layer][0]
  for opts in OPTIONS:
    generic = jconvrfm.patch_agop(fn, p, params, **opts)
    closed = jconvrfm.conv_agop(kernel, deltas, **opts)
    assert generic.shape == closed.shape == (p.shape[-1],) * 2
    tolerances.assert_rel_fro(generic, closed, 1e-6, f'layer {layer} {opts}')
    np.testing.assert_array_equal(generic, generic.T)
    np.testing.assert_array_equal(closed, closed.T)


def test_generic_matches_explicit_float64_formula(setup):
  x, params = setup
  for layer in (0, 2):
    p = layer_patches(x, params, layer)
    fn = functools.partial(suffix_fn, layer)
    for centered in (False, True):
      got = jconvrfm.patch_agop(fn, p, params, centered=centered)
      want = explicit_agop(fn, p, params, centered=centered)
      tolerances.assert_rel_fro(got, want, 1e-12, f'layer {layer} centered={centered}')
      # The centered AGOP is the uncentered one minus the mean-gradient outer products.
    uncentered = jconvrfm.patch_agop(fn, p, params)
    centered_ = jconvrfm.patch_agop(fn, p, params, centered=True)
    jbar = np.mean([np.asarray(jax.jacrev(fn)(p[i], params)) for i in range(N)], axis=0)
    jbar = jbar.reshape(-1, p.shape[-1])
    tolerances.assert_rel_fro(centered_, uncentered - jbar.T @ jbar, 1e-12, 'G - sum gbar gbar^T')


def test_generic_matches_finite_differences(setup):
  """Independent of autodiff: central differences of the network w.r.t. each patch entry."""
  x, params = setup
  layer = 2
  p = np.asarray(layer_patches(x, params, layer))[:2]
  fn = functools.partial(suffix_fn, layer)
  h = 1e-5
  shape = p.shape[1:]
  basis = np.eye(int(np.prod(shape))).reshape((-1,) + shape)
  grads = []
  for i in range(p.shape[0]):
    plus = jax.vmap(lambda e: fn(p[i] + h * e, params))(basis)
    minus = jax.vmap(lambda e: fn(p[i] - h * e, params))(basis)
    grads.append(((plus - minus) / (2 * h)).T.reshape((NUM_OUTPUTS,) + shape))
  flat = np.stack(grads).reshape(p.shape[0], -1, shape[-1])
  want = np.einsum('npd,npe->de', flat, flat) / p.shape[0]
  got = jconvrfm.patch_agop(fn, jnp.asarray(p), params)
  tolerances.assert_rel_fro(got, want, 1e-7, 'finite differences')


def test_position_mean_and_power(setup):
  x, params = setup
  p = layer_patches(x, params, 1)
  fn = functools.partial(suffix_fn, 1)
  g = jconvrfm.patch_agop(fn, p, params)
  num_positions = p.shape[1] * p.shape[2]
  tolerances.assert_rel_fro(jconvrfm.patch_agop(fn, p, params, reduce_positions='MEAN'),
                            g / num_positions, 1e-14, 'mean over positions')
  root = jconvrfm.patch_agop(fn, p, params, power=0.5)
  tolerances.assert_rel_fro(root @ root, g, 1e-10, 'power 1/2 squared')
  tolerances.assert_rel_fro(root, jconvrfm.sqrt_psd(g), 1e-12, 'power 1/2 == sqrt_psd')
  deltas = preact_grads(x, params, 1)
  kernel = params['convs'][1][0]
  croot = jconvrfm.conv_agop(kernel, deltas, power=0.5, centered=True)
  tolerances.assert_rel_fro(croot @ croot, jconvrfm.conv_agop(kernel, deltas, centered=True),
                            1e-10, 'closed form power 1/2 squared')


def test_closed_form_matches_explicit_sigma(setup):
  x, params = setup
  deltas = np.asarray(preact_grads(x, params, 1))
  w = np.asarray(params['convs'][1][0]).reshape(-1, 5)
  grads = np.einsum('dk,noijk->noijd', w, deltas)  # grad_{p_ij} f_o = W delta_{o,ij}
  flat = grads.reshape(N, -1, w.shape[0])
  want = np.einsum('npd,npe->de', flat, flat) / N
  tolerances.assert_rel_fro(jconvrfm.conv_agop(params['convs'][1][0], deltas), want, 1e-13,
                            'W Sigma W^T')
  centered = flat - flat.mean(axis=0, keepdims=True)
  want_c = np.einsum('npd,npe->de', centered, centered) / N
  tolerances.assert_rel_fro(jconvrfm.conv_agop(params['convs'][1][0], deltas, centered=True),
                            want_c, 1e-12, 'centered W Sigma W^T')
  # A single output per example: rank-4 preact_grads == the 5-D form with outputs = 1.
  tolerances.assert_rel_fro(jconvrfm.conv_agop(w, deltas[:, 0]),
                            jconvrfm.conv_agop(w, deltas[:, :1]), 1e-15, 'rank-4 form')


def test_chunked_equals_unchunked(setup):
  x, params = setup
  p = layer_patches(x, params, 1)
  fn = functools.partial(suffix_fn, 1)
  for centered in (False, True):
    whole = jconvrfm.patch_agop(fn, p, params, chunk_size=N, centered=centered)
    for chunk in (1, 3):  # 3 leaves a remainder chunk of 2.
      got = jconvrfm.patch_agop(fn, p, params, chunk_size=chunk, centered=centered)
      tolerances.assert_rel_fro(got, whole, 1e-13, f'chunk {chunk} centered={centered}')


def test_default_chunk_respects_budget(setup, monkeypatch):
  x, params = setup
  p = layer_patches(x, params, 1)
  fn = functools.partial(suffix_fn, 1)
  want = jconvrfm.patch_agop(fn, p, params, chunk_size=N)
  per_example = NUM_OUTPUTS * p.shape[1] * p.shape[2] * p.shape[3] * 8
  monkeypatch.setattr(agop_lib, 'DEFAULT_CHUNK_BYTES', 2 * per_example)
  seen = []
  original = agop_lib._patch_agop_sums

  def spy(*args):
    seen.append(args[3])
    return original(*args)

  monkeypatch.setattr(agop_lib, '_patch_agop_sums', spy)
  got = jconvrfm.patch_agop(fn, p, params)
  assert seen == [2]
  tolerances.assert_rel_fro(got, want, 1e-13, 'default chunk')


def test_jit_vmap_and_no_recompile(setup):
  x, params = setup
  p = layer_patches(x, params, 2)
  fn = functools.partial(suffix_fn, 2)
  eager = jconvrfm.patch_agop(fn, p, params, centered=True)
  jitted = jax.jit(lambda pt, prm: jconvrfm.patch_agop(fn, pt, prm, centered=True))
  tolerances.assert_rel_fro(jitted(p, params), eager, 1e-13, 'jit')
  # vmap over two parameter sets equals a loop.
  params2 = init_params(seed=5)
  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, params2)
  batched = jax.vmap(lambda prm: jconvrfm.patch_agop(fn, p, prm, chunk_size=2))(stacked)
  for i, prm in enumerate((params, params2)):
    tolerances.assert_rel_fro(batched[i], jconvrfm.patch_agop(fn, p, prm), 1e-12, f'vmap {i}')
  # Closed form under vmap over kernels and jit. (power=1: with power 1/2 this rank-3 G (k = 3,
  # d = 20) has 17 rounding-level eigenvalues whose roots are O(sqrt(eps)), and batched and
  # unbatched eigensolvers differ there on GPU.)
  deltas = preact_grads(x, params, 2)
  kernels = jnp.stack([params['convs'][2][0], params2['convs'][2][0]])
  vc = jax.vmap(lambda k: jconvrfm.conv_agop(k, deltas, centered=True))(kernels)
  for i in range(2):
    tolerances.assert_rel_fro(vc[i], jconvrfm.conv_agop(kernels[i], deltas, centered=True),
                              1e-12, f'conv_agop vmap {i}')
  tolerances.assert_rel_fro(jax.jit(jconvrfm.conv_agop)(kernels[0], deltas),
                            jconvrfm.conv_agop(kernels[0], deltas), 1e-12, 'conv_agop jit')
  # A second call with the same function and shapes does not recompile.
  before = agop_lib._patch_agop_sums._cache_size()
  jconvrfm.patch_agop(fn, p + 1, params, centered=True)
  assert agop_lib._patch_agop_sums._cache_size() == before


def test_scalar_output_and_forward_mode():
  rng = np.random.default_rng(2)
  # Scalar output (k = 1).
  p = jnp.asarray(rng.normal(size=(4, 3, 3, 4)))
  w = jnp.asarray(rng.normal(size=(4,)))
  scalar_fn = lambda pt, w: jnp.sum(jnp.sin(pt @ w))
  tolerances.assert_rel_fro(jconvrfm.patch_agop(scalar_fn, p, w),
                            explicit_agop(scalar_fn, p, w), 1e-12, 'scalar output')
  # More outputs than patch entries: the forward-mode Jacobian path.
  p = jnp.asarray(rng.normal(size=(3, 1, 2, 2)))
  a = jnp.asarray(rng.normal(size=(2, 9)))
  wide_fn = lambda pt, a: jnp.tanh(pt.reshape(-1, 2) @ a).reshape(-1)  # k = 18 > 4
  for centered in (False, True):
    tolerances.assert_rel_fro(jconvrfm.patch_agop(wide_fn, p, a, centered=centered),
                              explicit_agop(wide_fn, p, a, centered=centered), 1e-12,
                              f'forward mode centered={centered}')


def test_keeps_float32(setup):
  x, params = setup
  params32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  p32 = layer_patches(x.astype(jnp.float32), params32, 1)
  fn = functools.partial(suffix_fn, 1)
  g32 = jconvrfm.patch_agop(fn, p32, params32)
  assert g32.dtype == jnp.float32
  g64 = jconvrfm.patch_agop(fn, layer_patches(x, params, 1), params)
  tolerances.assert_rel_fro(g32, g64, 1e-5, 'float32 vs float64')
  deltas32 = preact_grads(x.astype(jnp.float32), params32, 1)
  assert jconvrfm.conv_agop(params32['convs'][1][0], deltas32).dtype == jnp.float32


def test_errors(setup):
  x, params = setup
  p = layer_patches(x, params, 2)
  fn = functools.partial(suffix_fn, 2)
  with pytest.raises(TypeError, match='fn'):
    jconvrfm.patch_agop('not a function', p, params)
  with pytest.raises(ValueError, match='patch_tensor'):
    jconvrfm.patch_agop(fn, p[0], params)
  with pytest.raises(ValueError, match='NaN'):
    jconvrfm.patch_agop(fn, p.at[0, 0, 0, 0].set(jnp.nan), params)
  with pytest.raises(ValueError, match='empty'):
    jconvrfm.patch_agop(fn, p[:0], params)
  with pytest.raises(ValueError, match='scalar or a vector'):
    jconvrfm.patch_agop(lambda pt: jnp.outer(pt.ravel(), pt.ravel()), p)
  with pytest.raises(ValueError, match='failed on one example'):
    jconvrfm.patch_agop(lambda pt, w: pt @ w, p, jnp.ones((7, 2)))
  with pytest.raises(ValueError, match='not finite'):  # d|p|/dp at p = 0 is NaN.
    jconvrfm.patch_agop(lambda pt: jnp.sqrt(jnp.sum(pt ** 2, -1)).ravel(), p.at[0].set(0.0))
  with pytest.raises(ValueError, match='chunk_size'):
    jconvrfm.patch_agop(fn, p, params, chunk_size=0)
  with pytest.raises(ValueError, match='reduce_positions'):
    jconvrfm.patch_agop(fn, p, params, reduce_positions='max')
  with pytest.raises(ValueError, match='power'):
    jconvrfm.patch_agop(fn, p, params, power=0.0)
  with pytest.raises(TypeError, match='centered'):
    jconvrfm.patch_agop(fn, p, params, centered='yes')
  kernel = params['convs'][2][0]
  deltas = preact_grads(x, params, 2)
  with pytest.raises(ValueError, match='number of filters'):
    jconvrfm.conv_agop(kernel, deltas[..., :2])
  with pytest.raises(ValueError, match='preact_grads'):
    jconvrfm.conv_agop(kernel, deltas[0, 0])
  with pytest.raises(ValueError, match='NaN'):
    jconvrfm.conv_agop(kernel, deltas.at[0, 0, 0, 0, 0].set(jnp.inf))
  with pytest.raises(ValueError, match='kernel'):
    jconvrfm.conv_agop(kernel[0], deltas)
  with pytest.raises(ValueError, match='power'):
    jconvrfm.conv_agop(kernel, deltas, power=-1.0)
