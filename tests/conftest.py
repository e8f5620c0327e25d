"""Shared test configuration.

Four simulated CPU devices (for sharding tests) and float64 are enabled before jax is
imported anywhere; tests that check float32 behaviour pass explicit dtypes.

Compiled programs go to a persistent compilation cache of this test run (a fresh temporary
folder, removed at the end; `JAX_COMPILATION_CACHE_DIR` overrides it). The pytest-xdist
workers inherit its path from the controlling process, so a program that several tests or
both workers build (the same HLO under different jit wrappers) is compiled once. It changes
no result: a cached program is the same executable. The folder's name carries the creating
process's id; folders left by runs that were killed (their process gone) are removed when
the next run starts.

Programs are compiled with `JAX_DISABLE_MOST_OPTIMIZATIONS=1` unless the variable is set:
jax then asks XLA for backend optimisation level 0 (LLVM's expensive passes off). The HLO
programs are those users run; their machine code is slower and may round differently (a
float32 CNTK matrix and its input gradient differed by 2e-7 relative from the optimised
code's, float32 rounding). The suite's programs are small and its
time is mostly compilation: the whole suite takes about a fifth less time (WORKSPACE.md).
Set the variable to 0 to test fully optimised code; `experiments_test.py` also runs one
binary fully optimised and compares it with the same run here.
"""

import os
import pathlib
import shutil
import tempfile

os.environ.setdefault('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=4'
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')

_CACHE_PREFIX = 'jconvrfm-test-xla-cache-'


def _remove_orphaned_caches():
  """Removes cache folders of earlier test runs whose creating process no longer exists."""
  for path in pathlib.Path(tempfile.gettempdir()).glob(_CACHE_PREFIX + '*'):
    pid = path.name[len(_CACHE_PREFIX):].partition('-')[0]
    if not pid.isdigit():
      continue
    try:
      os.kill(int(pid), 0)
    except ProcessLookupError:
      shutil.rmtree(path, ignore_errors=True)
    except OSError:  # the process exists (e.g. another user's): leave its folder
      pass


# Set up in the first process that imports this file (the xdist controller, or the only
# process); its subprocesses, the xdist workers among them, inherit the variables and so
# find the cache already set, as they would a user's own.
_OWN_CACHE = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _remove_orphaned_caches()
  _OWN_CACHE = tempfile.mkdtemp(prefix=f'{_CACHE_PREFIX}{os.getpid()}-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _OWN_CACHE
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

jax.config.update('jax_enable_x64', True)

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def shared_data_dir():
  """`$JCONVRFM_SHARED_DATA`, else `../shared/data` beside the checkout; None if absent."""
  env = os.environ.get('JCONVRFM_SHARED_DATA')
  path = pathlib.Path(env) if env else REPO_ROOT.parent / 'shared' / 'data'
  return path if path.is_dir() else None


@pytest.fixture(scope='session')
def shared_data():
  """The offline dataset folder; skips the test cleanly where it is absent."""
  path = shared_data_dir()
  if path is None:
    pytest.skip('shared data folder not found (set JCONVRFM_SHARED_DATA)')
  return path


@pytest.fixture(scope='session')
def mnist_dir(shared_data):
  path = shared_data / 'mnist'
  if not path.is_dir():
    pytest.skip('MNIST files not found in the shared data folder')
  return path


@pytest.fixture(scope='session')
def tfds_cache_dir(tmp_path_factory):
  """One tfds `data_dir` per test session (prepared datasets are cached there)."""
  env = os.environ.get('JCONVRFM_TFDS_CACHE')
  if env:
    return pathlib.Path(env)
  return tmp_path_factory.mktemp('tfds')


@pytest.fixture(scope='session')
def mnist_tfds(mnist_dir, tfds_cache_dir):
  """A tfds `data_dir` with MNIST prepared (once per session, ~20 s) from the shared files.

  Use as `jconvrfm.data.load_tfds('mnist', split, data_dir=mnist_tfds)`; passing
  `manual_dir=mnist_dir` as well is harmless.
  """
  from jconvrfm.data import load_tfds  # pylint: disable=g-import-not-at-top
  load_tfds('mnist', 'test[:1]', data_dir=tfds_cache_dir, manual_dir=mnist_dir)
  return tfds_cache_dir


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
