"""Smoke tests of the benchmark binaries: each runs end to end on tiny sizes.

Every benchmark compares a fast path with an independent slower one in the same run (fused
kernel vs neural-tangents, closed-form vs autodiff AGOP, one-pass vs per-class AGOP, native vs
XLA); these tests check that the scripts run, write `results.json`, time positive durations,
and that the two paths they time agree (the relative difference each script reports), so a
benchmark can never silently compare different computations. Timings themselves are not
asserted (shared, noisy machines).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT


def _launch(module, *flags):
  env = dict(os.environ)
  env['PYTHONPATH'] = str(REPO_ROOT) + os.pathsep + env.get('PYTHONPATH', '')
  # One CPU device, as a user's shell has (the test session simulates four).
  env['XLA_FLAGS'] = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                              if 'xla_force_host_platform_device_count' not in f)
  return subprocess.run([sys.executable, '-m', module, *flags], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, check=False, timeout=600)


def _run(module, workdir, *flags):
  proc = _launch(module, f'--workdir={workdir}', *flags)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout, json.loads((workdir / 'results.json').read_text())


def test_kernel_throughput_runs_and_fused_matches_neural_tangents(tmp_path):
  stdout, res = _run('experiments.benchmarks.kernel_throughput', tmp_path, '--n=4',
                     '--repeats=1', '--configs=42x42x1 q3 d3')
  assert 'Kernel throughput' in stdout
  rows = res['rows']
  assert {(r['metric'], r['impl']) for r in rows} == {
      (False, 'fused'), (False, 'nt'), (True, 'fused'), (True, 'nt')}
  for r in rows:
    assert r['finite'] and r['median_s'] > 0 and r['maxrss_mb'] > 0
    # float32 kernels of two independent implementations (measured: about 1e-7).
    assert r['rel_diff_fused_vs_nt'] < 1e-5


def test_kernel_throughput_rejects_unknown_configs(tmp_path):
  proc = _launch('experiments.benchmarks.kernel_throughput', f'--workdir={tmp_path}',
                 '--configs=nope')
  assert proc.returncode != 0
  assert not (tmp_path / 'results.json').exists()
  assert '--configs' in proc.stderr and 'nope' in proc.stderr


def test_agop_benchmark_runs_and_variants_agree(tmp_path):
  stdout, res = _run('experiments.benchmarks.agop_benchmark', tmp_path, '--num_images=8',
                     '--block_size=4', '--agop_chunk=4', '--width=4', '--depth=2',
                     '--image_size=10', '--repeats=1', '--measure_memory=false',
                     '--matmul_precision=highest')
  assert 'Patch AGOP benchmark' in stdout
  rows = res['rows']
  assert {(r['layer'], r['variant']) for r in rows} == {
      (0, 'closed'), (0, 'generic'), (1, 'closed'), (1, 'generic')}
  for r in rows:
    assert r['median_s'] > 0
    assert r['rel_err_generic_vs_closed'] < 1e-5


def test_agop_benchmark_measures_memory_in_worker_processes(tmp_path):
  _, res = _run('experiments.benchmarks.agop_benchmark', tmp_path, '--num_images=8',
                '--block_size=4', '--agop_chunk=4', '--width=4', '--depth=2',
                '--image_size=10', '--repeats=1', '--layers=1', '--variants=closed',
                '--measure_memory=true')
  (row,) = res['rows']
  baseline = res['baseline']['host_peak_mb']
  # Each worker is a fresh process that does what the baseline does (imports, parameters, one
  # input block) and then runs its variant: its peak is at least the baseline's.
  assert 0 < baseline <= row['host_peak_mb']


def test_convrfm_benchmark_runs_and_fast_agop_matches_per_class(tmp_path):
  stdout, res = _run('experiments.benchmarks.convrfm_benchmark', tmp_path, '--sizes=6:3',
                     '--image_size=8', '--classes=3', '--repeats=1')
  assert 'rel. diff' in stdout
  (row,) = res['rows']
  assert (row['n_train'], row['s']) == (6, 3)
  assert row['fast_s'] > 0 and row['reference_s'] > 0
  assert row['rel_diff'] < 1e-5


def test_native_benchmark_runs_and_paths_agree(tmp_path, monkeypatch):
  from jconvrfm._src.kernels import native  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('JCONVRFM_NATIVE', '1')  # as the benchmark's native worker
  stdout, res = _run('experiments.benchmarks.native_benchmark', tmp_path, '--kernel_n=16',
                     '--agop_n=16', '--pixels_n=5', '--repeats=1')
  assert 'Native CPU kernels vs XLA' in stdout
  assert [r['phase'] for r in res['rows']] == ['kernel', 'agop', 'pixels']
  # The AGOP's samples are its training images, so it holds pairs of an image with itself,
  # where float32 loses accuracy at the arccos's square-root singularity. Measured at this
  # size against the float64 XLA path: native 2.4e-6, XLA float32 8.5e-6; between the two
  # 7.8e-6 (the kernel phase: 5e-7).
  tolerance = {'kernel': 1e-5, 'agop': 5e-5, 'pixels': 1e-5}
  for r in res['rows']:
    # Where the library can build here, the worker must have used it.
    assert r['native']['native'] == native.available()
    assert r['xla']['finite'] and r['native']['finite']
    assert r['native']['median_s'] > 0 and r['xla']['median_s'] > 0
    assert np.isfinite(r['rel_diff'])
    assert r['rel_diff'] < tolerance[r['phase']], r


def test_deep_layer_benchmark_runs_and_paths_agree(tmp_path):
  stdout, res = _run('experiments.benchmarks.deep_layer_benchmark', tmp_path, '--kernel_n=20',
                     '--agop_n=6', '--channels=8', '--size=8', '--repeats=1')
  assert 'learned metric' in stdout
  assert [r['phase'] for r in res['rows']] == ['kernel', 'agop']
  for r in res['rows']:
    assert r['features']['finite'] and r['patches']['finite']
    assert r['features']['median_s'] > 0 and r['patches']['median_s'] > 0
    # float32, two computations of the same function (the AGOP's self pairs: see above).
    assert r['rel_diff'] < {'kernel': 1e-5, 'agop': 5e-5}[r['phase']], r


def test_multihost_scaling_benchmark_runs_and_processes_agree(tmp_path, monkeypatch):
  from jconvrfm._src.kernels import native  # pylint: disable=g-import-not-at-top
  if len(os.sched_getaffinity(0)) < 2:
    pytest.skip('needs two CPU cores (one per process)')
  monkeypatch.setenv('JCONVRFM_NATIVE', '1')
  # One path (the two-process XLA AGOP and tiles are tested in multihost_test.py and
  # tiling_test.py); both phases.
  paths = 'native' if native.available() else 'xla'
  # 300 images: the symmetric XLA path has 2 blocks (3 block pairs), so both processes work.
  stdout, res = _run('experiments.benchmarks.multihost_scaling', tmp_path, '--n=300',
                     '--image_size=8', '--depth=2', '--repeats=1', f'--paths={paths}')
  assert 'speed-up' in stdout
  rows = res['rows']
  assert [(r['phase'], r['path'], r['processes']) for r in rows] == [
      (ph, p, c) for ph in ('agop', 'kernel') for p in paths.split(',') for c in (1, 2)]
  for r in rows:
    assert r['finite'] and r['median_s'] > 0
    if r['phase'] == 'kernel':
      # Every entry is computed by one process, as in one process: bitwise equal.
      assert r['rel_diff'] == 0, r
    else:
      # float32 AGOPs summed in another order (measured at n = 800: 5e-8 and 1e-7).
      assert r['rel_diff'] < 1e-5, r


def test_multihost_scaling_benchmark_rejects_more_processes_than_cores(tmp_path):
  proc = _launch('experiments.benchmarks.multihost_scaling', f'--workdir={tmp_path}',
                 f'--processes={len(os.sched_getaffinity(0)) + 1}')
  assert proc.returncode != 0
  assert '--processes' in proc.stderr and not (tmp_path / 'results.json').exists()
