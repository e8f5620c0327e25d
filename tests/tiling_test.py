"""Tests for jconvrfm.kernel_matrix: tiled == direct, 4 devices == 1 device bit for bit."""

import functools
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jconvrfm
from jconvrfm import kernel_matrix
from jconvrfm._src import tiling
from tests import tolerances


def rbf(a, b):
  """Gaussian kernel on flattened inputs: (b1, ...), (b2, ...) -> (b1, b2)."""
  a = a.reshape(a.shape[0], -1)
  b = b.reshape(b.shape[0], -1)
  d2 = jnp.sum(a**2, 1)[:, None] + jnp.sum(b**2, 1)[None] - 2 * a @ b.T
  return jnp.exp(-d2 / a.shape[1])


def rbf_reference(a, b):
  """float64 numpy reference, entry by entry."""
  a = np.asarray(a, np.float64).reshape(a.shape[0], -1)
  b = np.asarray(b, np.float64).reshape(b.shape[0], -1)
  return np.exp(-((a[:, None] - b[None])**2).sum(-1) / a.shape[1])


def _data(n, seed, shape=(3, 2), dtype=np.float64):
  return np.random.default_rng(seed).normal(size=(n,) + shape).astype(dtype)


def test_four_simulated_devices():
  assert len(jax.local_devices()) == 4


@pytest.mark.parametrize('on_host', [True, False])
@pytest.mark.parametrize('n1,n2,block', [
    (37, None, 8),        # Symmetric: 5 x 5 blocks, 15 upper tiles, last block padded.
    (37, 23, (8, 5)),     # Rectangular, neither size divisible by its block or by 4.
    (5, 11, 16),          # Block larger than the data: one padded tile.
    (9, None, 1),         # 1 x 1 tiles.
])
def test_tiled_equals_direct_and_devices_agree_bitwise(n1, n2, block, on_host):
  x1 = _data(n1, 0)
  x2 = None if n2 is None else _data(n2, 1)
  ref = rbf_reference(x1, x1 if x2 is None else x2)
  one = kernel_matrix(rbf, x1, x2, block_size=block, devices=jax.local_devices()[:1],
                      on_host=on_host)
  four = kernel_matrix(rbf, x1, x2, block_size=block, devices=jax.local_devices(),
                       on_host=on_host)
  if on_host:
    assert isinstance(one, np.ndarray) and isinstance(four, np.ndarray)
  else:
    assert isinstance(four, jax.Array)
    assert four.devices() == {jax.local_devices()[0]}
  assert four.shape == ref.shape and four.dtype == np.float64
  tolerances.assert_rel_fro(four, ref, 1e-13, 'tiled vs float64 reference')
  np.testing.assert_array_equal(np.asarray(one), np.asarray(four))  # Bitwise.
  # The direct (unblocked) jnp computation agrees to rounding.
  tolerances.assert_rel_fro(four, rbf(x1, x1 if x2 is None else x2), 1e-14, 'tiled vs direct')


@pytest.mark.parametrize('on_host', [True, False])
def test_symmetric_blocks_are_mirrored_exactly(on_host):
  x = _data(13, 2)
  k = np.asarray(kernel_matrix(rbf, x, block_size=4, on_host=on_host))
  for i in range(0, 13, 4):
    for j in range(i + 4, 13, 4):
      np.testing.assert_array_equal(k[j:j + 4, i:i + 4], k[i:i + 4, j:j + 4].T)


def test_on_host_and_on_device_agree_bitwise():
  x1, x2 = _data(19, 3), _data(10, 4)
  a = kernel_matrix(rbf, x1, x2, block_size=(4, 6), on_host=True)
  b = kernel_matrix(rbf, x1, x2, block_size=(4, 6), on_host=False)
  np.testing.assert_array_equal(a, np.asarray(b))


def test_float32_stays_float32():
  x = _data(10, 5, dtype=np.float32)
  k = kernel_matrix(rbf, x, block_size=3)
  assert k.dtype == np.float32
  tolerances.assert_rel_fro(k, rbf_reference(x, x), 1e-6, 'float32')


@pytest.mark.parametrize('num_devices,expected', [
    (1, list(range(1, 16))),
    (4, [4, 8, 12, 15]),
])
def test_progress_callback_counts(num_devices, expected):
  calls = []
  kernel_matrix(rbf, _data(37, 0), block_size=8, devices=jax.local_devices()[:num_devices],
                progress=lambda done, total: calls.append((done, total)))
  assert calls == [(d, 15) for d in expected]  # 5 x 5 blocks -> 15 upper tiles.
  calls.clear()
  kernel_matrix(rbf, _data(10, 0), _data(7, 1), block_size=3,
                progress=lambda done, total: calls.append((done, total)))
  assert calls[-1] == (12, 12) and len(calls) == 3  # 4 x 3 tiles in rounds of 4.


def test_tqdm_progress_runs(capsys):
  k = kernel_matrix(rbf, _data(6, 0), block_size=2, progress=True)
  tolerances.assert_rel_fro(k, rbf_reference(_data(6, 0), _data(6, 0)), 1e-13, 'tqdm run')
  assert '6/6' in capsys.readouterr().err


def test_compiles_once_for_padded_tiles():
  traces = []

  def counted(a, b):
    traces.append((a.shape, b.shape))
    return rbf(a, b)

  x1, x2 = _data(23, 0), _data(10, 1)
  kernel_matrix(counted, x1, x2, block_size=(8, 4))  # 3 x 3 tiles, ragged in both axes.
  # One abstract shape check plus one trace of the per-tile program, all tiles (8, 4).
  assert traces == [((8, 3, 2), (4, 3, 2))] * 2
  kernel_matrix(counted, x1, x2, block_size=(8, 4))
  assert len(traces) == 2  # No new trace: the shape check and the tile program are cached.


def _scaled_rbf(a, b, scale):
  return scale * rbf(a, b)


_TRACES = []


def _counted_scaled_rbf(a, b, scale):
  _TRACES.append((a.shape, b.shape))
  return _scaled_rbf(a, b, scale)


@pytest.mark.parametrize('block', [None, 4])
def test_kernel_args_are_traced_not_recompiled(block):
  """New values of `kernel_args` reuse the tile program and equal a closure over them."""
  x1, x2 = _data(11, 2), _data(6, 3)
  _TRACES.clear()
  for scale in (0.5, 2.0, 3.0):
    got = kernel_matrix(_counted_scaled_rbf, x1, x2, block_size=block,
                        kernel_args=(np.float64(scale),))
    np.testing.assert_allclose(got, scale * rbf_reference(x1, x2), rtol=1e-12)
  first = len(_TRACES)
  kernel_matrix(_counted_scaled_rbf, x1, x2, block_size=block, kernel_args=(np.float64(7.0),))
  assert len(_TRACES) == first   # no retrace for a new value
  sym = kernel_matrix(_scaled_rbf, x1, block_size=block, kernel_args=(np.float64(2.0),))
  np.testing.assert_allclose(sym, 2.0 * rbf_reference(x1, x1), rtol=1e-12)


def test_choose_block_shape_fits_budget():
  kw = dict(bytes_per_entry=40.0, row_bytes1=100.0, row_bytes2=100.0)
  for budget in (1e3, 5e4, 3e6):
    b1, b2 = tiling.choose_block_shape(10**5, 10**5, budget_bytes=budget, symmetric=True, **kw)
    assert b1 == b2
    assert 40 * b1 * b1 + 200 * b1 <= budget < 40 * (b1 + 1)**2 + 200 * (b1 + 1)
  # One side capped by the data: the other side takes the rest of the budget.
  b1, b2 = tiling.choose_block_shape(5, 10**5, budget_bytes=5e4, symmetric=False, **kw)
  assert b1 == 5 and 40 * 5 * b2 + 500 + 100 * b2 <= 5e4 < 40 * 5 * (b2 + 1) + 500 + 100 * (b2 + 1)
  assert tiling.choose_block_shape(7, 7, budget_bytes=1.0, symmetric=True, **kw) == (1, 1)


def test_memory_budget_picks_block_and_matches():
  x = _data(30, 0)
  calls = []
  k = kernel_matrix(rbf, x, memory_budget_bytes=8 * 100 + 2 * 10 * 48, bytes_per_entry=8,
                    progress=lambda d, t: calls.append(t))
  # 8 b^2 + 96 b <= 1760 -> b = 10, so 3 x 3 blocks and 6 upper tiles.
  assert calls[-1] == 6
  tolerances.assert_rel_fro(k, rbf_reference(x, x), 1e-13, 'budgeted')
  bpe = tiling.estimate_bytes_per_entry(rbf, x, x)
  assert bpe >= 8  # At least the float64 output.
  k2 = kernel_matrix(rbf, x, memory_budget_bytes=2**16)  # Measured bytes per entry.
  calls.clear()
  big = _data(tiling.DEFAULT_MAX_BLOCK + 3, 1, shape=(1,))
  kernel_matrix(rbf, big, big[:2], bytes_per_entry=8, memory_budget_bytes=2**40,
                progress=lambda d, t: calls.append(t))
  assert calls[-1] == 1  # A (515, 2) tile has fewer entries than the 512 x 512 cap.
  calls.clear()
  kernel_matrix(rbf, big, bytes_per_entry=8, memory_budget_bytes=2**40,
                progress=lambda d, t: calls.append(t))
  # Symmetric: at least SYMMETRIC_MIN_BLOCKS blocks per side unless blocks would fall under
  # 64 rows, so here blocks of 64 at most, evened out to ceil(515 / 9) = 58: 9 x 9 blocks.
  assert tiling.SYMMETRIC_MIN_BLOCKS * 64 > 515
  assert calls[-1] == 9 * 10 // 2
  calls.clear()
  kernel_matrix(rbf, big[:500], big[:500] + 0.0, bytes_per_entry=8, memory_budget_bytes=2**40,
                progress=lambda d, t: calls.append(t))
  assert calls[-1] == 1  # Not symmetric (x2 given): one 500 x 500 tile.
  tolerances.assert_rel_fro(k2, rbf_reference(x, x), 1e-13, 'measured budget')


def test_non_finite_kernel_names_the_tile():
  def bad(a, b):
    k = rbf(a, b)
    return jnp.where(a[:, :1, 0] > 10, jnp.nan, k)

  x = _data(12, 0)
  x[9] = 20.0
  with pytest.raises(ValueError, match=r'non-finite.*rows 8\.\.11'):
    kernel_matrix(bad, x, block_size=4)
  with pytest.raises(ValueError, match=r'non-finite.*rows 8\.\.11'):
    kernel_matrix(bad, x, block_size=4, on_host=False)


def test_errors():
  x, y = _data(6, 0), _data(5, 1)
  with pytest.raises(TypeError, match='kernel_fn'):
    kernel_matrix('rbf', x)
  with pytest.raises(ValueError, match='trailing shape'):
    kernel_matrix(rbf, x, _data(5, 1, shape=(2, 3)))
  with pytest.raises(TypeError, match='same dtype'):
    kernel_matrix(rbf, x, y.astype(np.float32))
  with pytest.raises(ValueError, match='block_size'):
    kernel_matrix(rbf, x, block_size=0)
  with pytest.raises(ValueError, match='square'):
    kernel_matrix(rbf, x, block_size=(2, 3))
  with pytest.raises(ValueError, match='not both'):
    kernel_matrix(rbf, x, block_size=2, memory_budget_bytes=1e6)
  with pytest.raises(ValueError, match='memory_budget_bytes'):
    kernel_matrix(rbf, x, memory_budget_bytes=-1)
  with pytest.raises(ValueError, match='bytes_per_entry'):
    kernel_matrix(rbf, x, bytes_per_entry=float('nan'))
  with pytest.raises(ValueError, match=r'\(2, 2\) matrix'):
    kernel_matrix(lambda a, b: rbf(a, b)[:, :1], x, block_size=2)
  x_nan = x.copy()
  x_nan[2, 0, 0] = np.nan
  with pytest.raises(ValueError, match='x1.*NaN'):
    kernel_matrix(rbf, x_nan, block_size=2)
  with pytest.raises(ValueError, match='x2.*empty'):
    kernel_matrix(rbf, x, x[:0], block_size=2)
  with pytest.raises(TypeError, match='devices'):
    kernel_matrix(rbf, x, block_size=2, devices=[])
  with pytest.raises(ValueError, match='repeat'):
    kernel_matrix(rbf, x, block_size=2, devices=[jax.local_devices()[0]] * 2)
  with pytest.raises(TypeError, match='progress'):
    kernel_matrix(rbf, x, block_size=2, progress='bar')


def test_conv_ntk_tiles_match_direct():
  if not hasattr(jconvrfm, 'conv_ntk'):
    pytest.skip('jconvrfm.conv_ntk not available yet')
  x1 = np.random.default_rng(0).uniform(size=(7, 6, 6, 2))
  x2 = np.random.default_rng(1).uniform(size=(5, 6, 6, 2))
  fn = functools.partial(jconvrfm.conv_ntk, depth=2, patch_size=3)
  direct = np.asarray(fn(x1, x2))
  one = kernel_matrix(fn, x1, x2, block_size=3, devices=jax.local_devices()[:1])
  four = kernel_matrix(fn, x1, x2, block_size=3)
  np.testing.assert_array_equal(one, four)
  tolerances.assert_rel_fro(four, direct, 1e-12, 'conv_ntk tiled vs direct')
  # Diagonal tiles are computed as kernel_fn(block, block), i.e. with the two-argument formula;
  # `conv_ntk(x1)` instead evaluates its diagonal with the exact zero-angle recursion, which
  # differs at the arccos kink by ~1e-9 in float64. Compare like with like.
  sym = kernel_matrix(fn, x1, block_size=2, on_host=False)
  tolerances.assert_rel_fro(sym, np.asarray(fn(x1, x1)), 1e-12, 'conv_ntk symmetric')


def test_docstring_example():
  import doctest  # pylint: disable=g-import-not-at-top
  assert doctest.testmod(tiling).failed == 0


_MULTI_PROCESS_WORKER = '''
import os, sys
process_id, port, out_dir, repo = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
sys.path.insert(0, repo)
import jax
jax.config.update('jax_enable_x64', True)
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(coordinator_address='localhost:' + port, num_processes=2,
                           process_id=process_id)
import numpy as np
from jconvrfm import kernel_matrix
from tests.tiling_test import rbf, _data
assert len(jax.devices()) == 4 and len(jax.local_devices()) == 2
calls = []
sym = kernel_matrix(rbf, _data(37, 0), block_size=8, progress=lambda d, t: calls.append(d))
rect = kernel_matrix(rbf, _data(37, 0), _data(23, 1), block_size=(8, 5))
np.savez(os.path.join(out_dir, f'process{process_id}.npz'), sym=sym, rect=rect, calls=calls)
'''


def test_two_processes_match_one_process_bitwise(tmp_path):
  """Multi-host on CPU: 2 processes x 2 devices (gloo) give the single-process result."""
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  repo = str(pathlib.Path(__file__).resolve().parent.parent)
  worker = tmp_path / 'worker.py'
  worker.write_text(_MULTI_PROCESS_WORKER)
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = str(s.getsockname()[1])
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  procs = [subprocess.Popen([sys.executable, str(worker), str(i), port, str(tmp_path), repo],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  try:
    logs = [p.communicate(timeout=300)[0].decode()[-2000:] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert all(p.returncode == 0 for p in procs), logs
  sym = kernel_matrix(rbf, _data(37, 0), block_size=8)
  rect = kernel_matrix(rbf, _data(37, 0), _data(23, 1), block_size=(8, 5))
  for i in range(2):
    out = np.load(tmp_path / f'process{i}.npz')
    np.testing.assert_array_equal(out['sym'], sym)
    np.testing.assert_array_equal(out['rect'], rect)
    np.testing.assert_array_equal(out['calls'], [4, 8, 12, 15])
