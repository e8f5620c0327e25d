"""Tests for `third_party.nt_compat`: neural-tangents 0.6.5 on current jax, without TF.

Each check compares neural-tangents against something independent: a numpy closed form of
the infinite-width recursion (full spatial covariances, explicit loops), an explicit
Jacobian contraction, or a fresh interpreter that probes jax itself.
"""

import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import tolerances
from tests.conftest import REPO_ROOT

from jconvrfm._src.kernels.nt import import_neural_tangents

nt = import_neural_tangents()
stax = nt.stax


def _run_python(code: str) -> str:
  env = dict(os.environ)
  env['PYTHONPATH'] = str(REPO_ROOT) + os.pathsep + env.get('PYTHONPATH', '')
  env['JAX_PLATFORMS'] = 'cpu'
  out = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout.strip().splitlines()[-1]


# A fresh interpreter lists, by its own probes, what neural-tangents needs and jax lacks;
# `apply()` must patch exactly that, and nothing on the second call.
_PROBE = """
import importlib, json, sys
import jax, jax.core
from jax.interpreters import ad
missing = []
for name in ('Jaxpr', 'JaxprEqn', 'Literal', 'Var', 'Primitive', 'ShapedArray',
             'AbstractValue', 'Value', 'eval_context'):
  if not hasattr(jax.core, name):
    missing.append('jax.core.' + name)
if not hasattr(jax.core, 'DShapedArray'):
  missing.append('jax.core.DShapedArray')
prim = getattr(jax.core, 'Primitive', None)
if prim is None:
  import jax.extend.core
  prim = jax.extend.core.Primitive
if not hasattr(prim, 'map_primitive'):
  missing.append('jax.core.Primitive.map_primitive')
try:
  import jax.util
  has_util = hasattr(jax.util, 'safe_map') and hasattr(jax.util, 'safe_zip')
except ImportError:
  missing.append('jax.util')
for name in ('zeros_like_p', 'source_info_util', 'reducing_transposes', 'config'):
  if not hasattr(ad, name):
    missing.append('jax.interpreters.ad.' + name)
try:  # The old call form: a WrappedFun and positional primals, 4 results with PartialVals.
  from jax.extend import linear_util as lu
  out = ad.linearize(lu.wrap_init(lambda x: [x * 2.0]), jax.numpy.float32(1.0))
  assert len(out) == 4 and hasattr(out[1][0], 'is_known')
except Exception:
  missing.append('jax.interpreters.ad.linearize')
missing.append('neural_tangents.experimental')
analysis = jax.jit(lambda x: x + 1).lower(1.0).compile().cost_analysis()
if isinstance(analysis, dict):
  missing.append('neural_tangents._src.empirical._get_flops')
import warnings
import jax.numpy as jnp
def fails(fn):  # raises, or warns that a later jax will raise
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('error', DeprecationWarning)
      fn()
    return False
  except Exception:
    return True
if fails(lambda: jnp.dtype(jnp.zeros((1,), jnp.float32))):
  missing.append('neural_tangents._src.empirical._get_fx_axis_and_dtype')
s = jax.ShapeDtypeStruct((2, 3), jnp.float32)
if fails(lambda: (jnp.size(s), jax.dtypes.result_type(s, s))):
  missing.append('neural_tangents._src.empirical._unravel_array_into_pytree')
  missing.append('neural_tangents._src.empirical._std_basis')
import inspect
try:
  from jax.extend.core import DebugInfo
  if 'debug_info' in inspect.signature(lu.wrap_init).parameters:
    missing.append('neural_tangents._src.empirical.lu')
except ImportError:
  pass
from third_party import nt_compat
first = nt_compat.apply()
second = nt_compat.apply()
import neural_tangents
print(json.dumps({'missing': missing, 'first': first, 'second': second,
                  'tf': 'tensorflow' in sys.modules, 'tf2jax': 'tf2jax' in sys.modules}))
"""


def test_apply_patches_exactly_what_is_missing():
  result = json.loads(_run_python(_PROBE))
  assert sorted(result['first']) == sorted(result['missing'])
  assert result['second'] == []
  assert not result['tf'] and not result['tf2jax']


def test_import_without_tensorflow_computes_an_nt_kernel():
  code = """
  import sys
  sys.modules['tensorflow'] = None  # any `import tensorflow` now raises ImportError
  sys.modules['tf2jax'] = None
  import numpy as np
  import jconvrfm
  x = np.random.default_rng(0).normal(size=(2, 6, 6, 1)).astype(np.float32)
  k = np.asarray(jconvrfm.conv_ntk(x, depth=2, patch_size=3, impl='nt'))
  assert k.shape == (2, 2) and np.all(np.isfinite(k)) and k[0, 0] > 0
  print('ok', sys.modules.get('tensorflow'), sys.modules.get('tf2jax'))
  """
  assert _run_python(code) == 'ok None None'


def test_experimental_stub_raises_clear_import_error():
  with pytest.raises(ImportError, match='TensorFlow'):
    _ = nt.experimental.empirical_ntk_fn_tf
  assert not hasattr(nt.experimental, '__wrapped__')  # dunders stay AttributeErrors


def test_apply_is_idempotent_in_process():
  from third_party import nt_compat  # pylint: disable=g-import-not-at-top
  assert nt_compat.apply() == []
  assert 'neural_tangents.experimental' in nt_compat.patched()


# ------------------------------------------------------------------------------------------
# stax kernels against an independent closed form (full spatial covariances, numpy loops).
# ------------------------------------------------------------------------------------------


def _relu_np(kxx, kyy, kxy):
  norm = np.sqrt(kxx * kyy)
  cos = np.clip(kxy / norm, -1, 1)
  t = np.arccos(cos)
  r = norm * (np.sin(t) + (np.pi - t) * cos) / (2 * np.pi)  # E[relu(u) relu(v)]
  d = (np.pi - t) / (2 * np.pi)  # E[relu'(u) relu'(v)]
  return r, d


def _closed_form(x, w_conv, b_conv, q, w_out, b_out):
  """NNGP and NTK of Conv(q, SAME) - Relu - AvgPool(2, 2) - Flatten - Dense, all pairs.

  Positions are flattened; `k[a, b, p, r]` is the covariance of input a at position p with
  input b at position r.
  """
  n, h, w, c = x.shape
  pos = list(itertools.product(range(h), range(w)))
  lo = (q - 1) // 2
  # Input layer covariance: channel mean of products (NT's convention).
  xin = x.reshape(n, h * w, c)
  k0 = np.einsum('apc,brc->abpr', xin, xin) / c

  def idx(i, j):
    return i * w + j if (0 <= i < h and 0 <= j < w) else None

  k1 = np.zeros_like(k0)
  for (p, (i, j)), (r, (k, l)) in itertools.product(enumerate(pos), enumerate(pos)):
    total = 0.0 * k0[:, :, 0, 0]
    for du, dv in itertools.product(range(q), range(q)):
      pp, rr = idx(i + du - lo, j + dv - lo), idx(k + du - lo, l + dv - lo)
      if pp is not None and rr is not None:
        total = total + k0[:, :, pp, rr]
    k1[:, :, p, r] = w_conv**2 * total / q**2 + b_conv**2
  t1 = k1.copy()
  diag = np.einsum('aapp->ap', k1)
  r1, d1 = _relu_np(diag[:, None, :, None], diag[None, :, None, :], k1)
  t1 = t1 * d1
  # AvgPool 2x2, stride 2, VALID.
  ho, wo = h // 2, w // 2
  pool = np.zeros((ho * wo, h * w))
  for i, j in itertools.product(range(ho), range(wo)):
    for du, dv in itertools.product(range(2), range(2)):
      pool[i * wo + j, (2 * i + du) * w + 2 * j + dv] = 0.25
  r2 = np.einsum('Pp,abpr,Rr->abPR', pool, r1, pool)
  t2 = np.einsum('Pp,abpr,Rr->abPR', pool, t1, pool)
  # Flatten + Dense: mean over same positions.
  nngp = w_out**2 * np.einsum('abpp->ab', r2) / (ho * wo) + b_out**2
  ntk = nngp + w_out**2 * np.einsum('abpp->ab', t2) / (ho * wo)
  return nngp, ntk


def test_stax_conv_relu_pool_flatten_dense_match_closed_form():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 4, 4, 2))
  q, w_conv, b_conv, w_out, b_out = 3, 1.7, 0.3, 1.2, 0.4
  _, _, kernel_fn = stax.serial(
      stax.Conv(5, (q, q), padding='SAME', W_std=w_conv, b_std=b_conv), stax.Relu(),
      stax.AvgPool((2, 2), strides=(2, 2)), stax.Flatten(),
      stax.Dense(1, W_std=w_out, b_std=b_out))
  k = kernel_fn(jnp.asarray(x), None, ('nngp', 'ntk'))
  nngp, ntk = _closed_form(x, w_conv, b_conv, q, w_out, b_out)
  tolerances.assert_rel_fro(k.nngp, nngp, 1e-10, 'nngp')
  tolerances.assert_rel_fro(k.ntk, ntk, 1e-10, 'ntk')


def test_nt_batch_equals_unbatched():
  rng = np.random.default_rng(1)
  x1 = jnp.asarray(rng.normal(size=(4, 6, 6, 1)))
  x2 = jnp.asarray(rng.normal(size=(8, 6, 6, 1)))
  _, _, kernel_fn = stax.serial(stax.Conv(1, (3, 3), W_std=1.5), stax.Relu(),
                                stax.Conv(1, (3, 3), W_std=1.5), stax.Relu(), stax.Flatten(),
                                stax.Dense(1))
  full = kernel_fn(x1, x2, 'ntk')
  for device_count in (0, -1):  # serial batches, and pmap over the 4 simulated devices
    batched = nt.batch(kernel_fn, batch_size=2, device_count=device_count)(x1, x2, 'ntk')
    tolerances.assert_rel_fro(batched, full, 1e-12, f'batch device_count={device_count}')


@pytest.mark.parametrize('implementation', [1, 2, 3])
def test_empirical_ntk_matches_explicit_jacobians(implementation):
  rng = np.random.default_rng(2)
  x1 = jnp.asarray(rng.normal(size=(2, 5, 5, 2)))
  x2 = jnp.asarray(rng.normal(size=(3, 5, 5, 2)))
  init_fn, apply_fn, _ = stax.serial(stax.Conv(4, (3, 3), padding='SAME'), stax.Relu(),
                                     stax.Conv(3, (2, 2)), stax.Erf(), stax.Flatten(),
                                     stax.Dense(3))
  _, params = init_fn(jax.random.PRNGKey(0), x1.shape)

  def flat_jac(x):
    jac = jax.jacobian(lambda p: apply_fn(p, x))(params)
    leaves = jax.tree_util.tree_leaves(jac)
    return jnp.concatenate([l.reshape(l.shape[:2] + (-1,)) for l in leaves], axis=-1)

  j1, j2 = flat_jac(x1), flat_jac(x2)
  expected = jnp.einsum('akP,blP->abkl', j1, j2)
  fn = nt.empirical_ntk_fn(apply_fn, trace_axes=(), implementation=implementation)
  got = fn(x1, x2, params)
  assert got.shape == (2, 3, 3, 3)
  tolerances.assert_rel_fro(got, expected, 1e-10, f'implementation {implementation}')
  traced = nt.empirical_ntk_fn(apply_fn, implementation=implementation)(x1, x2, params)
  tolerances.assert_rel_fro(traced, jnp.einsum('abkk->ab', expected) / 3, 1e-10, 'traced')


def test_auto_implementation_uses_flops():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 4)))
  init_fn, apply_fn, _ = stax.serial(stax.Dense(8), stax.Relu(), stax.Dense(2))
  _, params = init_fn(jax.random.PRNGKey(1), x.shape)
  auto = nt.empirical_ntk_fn(apply_fn, implementation=nt.NtkImplementation.AUTO)(
      x, None, params)
  ref = nt.empirical_ntk_fn(apply_fn, implementation=1)(x, None, params)
  tolerances.assert_rel_fro(auto, ref, 1e-10, 'AUTO')
  assert math.isfinite(float(jnp.sum(auto)))


@pytest.mark.parametrize('implementation', [1, 2, 3])
def test_empirical_ntk_runs_free_of_jax_deprecations(implementation):
  """No call that current jax deprecates (and a later jax rejects) is left on NT's path."""
  import warnings  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(3, 4, 4, 1)))
  init_fn, apply_fn, _ = stax.serial(stax.Conv(3, (2, 2)), stax.Relu(), stax.Flatten(),
                                     stax.Dense(2))
  _, params = init_fn(jax.random.PRNGKey(3), x.shape)
  ref = nt.empirical_ntk_fn(apply_fn, trace_axes=(), implementation=1)(x, None, params)
  with warnings.catch_warnings():
    warnings.simplefilter('error', DeprecationWarning)
    got = nt.empirical_ntk_fn(apply_fn, trace_axes=(), implementation=implementation)(
        x, None, params)
  tolerances.assert_rel_fro(got, ref, 1e-10, f'implementation {implementation}')


def test_forward_compatible_helpers_match_neural_tangents():
  """The replacements for deprecated calls agree with NT's originals and with the definition."""
  from third_party import nt_compat  # pylint: disable=g-import-not-at-top
  from neural_tangents._src import empirical  # pylint: disable=g-import-not-at-top
  prefix = 'neural_tangents._src.empirical.'
  orig = lambda name: nt_compat.ORIGINALS.get(prefix + name, getattr(empirical, name))
  tree = {'a': jnp.ones((2, 3), jnp.float32), 'b': [jnp.zeros((4,), jnp.float64)]}
  # The standard basis of the flattened tree is the identity (the definition).
  basis = nt_compat._std_basis_compat(tree)  # pylint: disable=protected-access
  flat = jnp.concatenate([l.reshape(10, -1) for l in jax.tree_util.tree_leaves(basis)], axis=1)
  assert flat.dtype == jnp.float64
  np.testing.assert_array_equal(np.asarray(flat), np.eye(10))
  # Unravelling along any axis, against NT's own helper (arrays: no deprecated call there).
  rng = np.random.default_rng(6)
  arr = jnp.asarray(rng.normal(size=(5, 10, 2)))
  for axis in (1, -2):
    ours = nt_compat._unravel_array_into_pytree_compat(tree, axis, arr)  # pylint: disable=protected-access
    theirs = orig('_unravel_array_into_pytree')(tree, axis, arr)
    for x, y in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
      assert x.shape == y.shape
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  shapes = jax.tree_util.tree_map(lambda l: jax.ShapeDtypeStruct(l.shape, l.dtype), tree)
  from_structs = nt_compat._unravel_array_into_pytree_compat(shapes, 1, arr)  # pylint: disable=protected-access
  assert [l.shape for l in jax.tree_util.tree_leaves(from_structs)] == [(5, 2, 3, 2), (5, 4, 2)]
  fx = jnp.ones((3, 2))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)  # NT's original, on this jax
    expected = orig('_get_fx_axis_and_dtype')(fx, None, tree)
  assert nt_compat._get_fx_axis_and_dtype_compat(fx, None, tree) == expected  # pylint: disable=protected-access


def test_empirical_ntk_passes_debug_info_to_wrap_init():
  """The structured-derivatives path calls `lu.wrap_init` without the deprecated omission."""
  import warnings  # pylint: disable=g-import-not-at-top
  from neural_tangents._src import empirical  # pylint: disable=g-import-not-at-top
  from third_party import nt_compat  # pylint: disable=g-import-not-at-top
  from jax.extend import linear_util  # pylint: disable=g-import-not-at-top
  if not nt_compat._wrap_init_takes_debug_info(linear_util):  # pylint: disable=protected-access
    pytest.skip('this jax has no DebugInfo argument to pass')
  assert nt_compat._is_compat(empirical.lu)  # pylint: disable=protected-access
  wrapped = empirical.lu.wrap_init(lambda x: [x])
  assert wrapped.debug_info.traced_for == 'neural_tangents'
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, 4)))
  init_fn, apply_fn, _ = stax.serial(stax.Dense(5), stax.Relu(), stax.Dense(2))
  _, params = init_fn(jax.random.PRNGKey(2), x.shape)
  ref = nt.empirical_ntk_fn(apply_fn, implementation=1)(x, None, params)
  with warnings.catch_warnings():
    warnings.filterwarnings('error', message='linear_util.wrap_init', category=DeprecationWarning)
    got = nt.empirical_ntk_fn(apply_fn, implementation=3)(x, None, params)
  tolerances.assert_rel_fro(got, ref, 1e-10, 'structured derivatives vs Jacobian contraction')
