"""experiments/multihost.py: the shared workdir, and the binaries run as two processes."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from experiments import convrfm as exp
from experiments import deep_convrfm as deep_exp
from experiments import multihost

from tests.experiments_test import _values
from tests.experiments_test import assert_same_rounds
from tests.experiments_test import TINY

REPO = pathlib.Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# One process: plain files, atomic writes.
# ----------------------------------------------------------------------------------------------


def test_workdir_reads_what_it_wrote_and_none_for_missing_files(tmp_path):
  wd = multihost.Workdir.create(str(tmp_path / 'a' / 'b'))
  assert wd.root.is_dir()
  assert wd.read_bytes('x.bin') is None and wd.load_npz('r.npz') is None
  assert not wd.exists('x.bin') and not any(wd.root.iterdir())
  wd.write_bytes('x.bin', b'\x00\x01payload')
  wd.write_json('c.json', {'q': 3, 'ridges': (1e-3,)})
  a = np.arange(12, dtype=np.float32).reshape(3, 4)
  wd.save_npz('r.npz', metric=a, round=np.asarray(2))
  wd.save_npy('f.npy', a.T)
  assert (tmp_path / 'a' / 'b' / 'x.bin').read_bytes() == b'\x00\x01payload'
  assert wd.read_bytes('x.bin') == b'\x00\x01payload' and wd.exists('x.bin')
  assert wd.read_json('c.json') == {'q': 3, 'ridges': [1e-3]}
  z = wd.load_npz('r.npz')
  np.testing.assert_array_equal(z['metric'], a)
  assert int(z['round']) == 2
  np.testing.assert_array_equal(wd.load_npy('f.npy'), a.T)
  # Every write went through a temporary file that was renamed: none is left behind.
  assert sorted(p.name for p in wd.root.iterdir()) == ['c.json', 'f.npy', 'r.npz', 'x.bin']


def test_workdir_write_failure_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
  wd = multihost.Workdir.create(str(tmp_path))
  wd.write_text('m.jsonl', 'old\n')

  def fail(src, dst):
    raise OSError(f'disk full while renaming {src} to {dst}')

  monkeypatch.setattr(multihost.os, 'replace', fail)
  with pytest.raises(OSError, match='disk full'):
    wd.write_text('m.jsonl', 'new\n')
  monkeypatch.undo()
  assert wd.read_text('m.jsonl') == 'old\n'
  assert [p.name for p in tmp_path.iterdir()] == ['m.jsonl']


def test_workdir_create_without_root_makes_a_temporary_folder():
  wd = multihost.Workdir.create(None, prefix='jconvrfm_mh_test_')
  try:
    assert wd.root.is_dir() and wd.root.name.startswith('jconvrfm_mh_test_')
  finally:
    wd.root.rmdir()


def test_workdir_save_figure_writes_a_png(tmp_path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots()
  ax.plot([0, 1], [1, 0])
  wd = multihost.Workdir.create(str(tmp_path))
  wd.save_figure('f.png', fig, dpi=50)
  assert (tmp_path / 'f.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert not plt.fignum_exists(fig.number)


@pytest.mark.parametrize('argv,match', [
    (['--process_id=1'], '--process_id need --distributed'),
    (['--num_processes=2', '--coordinator_address=h:1'],
     '--coordinator_address, --num_processes need --distributed'),
    (['--distributed', '--num_processes=0'], 'num_processes must be positive'),
    (['--distributed', '--num_processes=2', '--process_id=2'], r'process_id must be in'),
])
def test_distributed_flags_are_checked_before_anything_runs(tmp_path, argv, match):
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=match):
    exp.run(_values(exp.define_flags, TINY + [f'--workdir={workdir}'] + argv))
  assert not workdir.exists()


# ----------------------------------------------------------------------------------------------
# Two processes x two CPU devices (gloo), as on two hosts of a pod slice.
# ----------------------------------------------------------------------------------------------


def _free_port() -> str:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return str(s.getsockname()[1])


def _launch(module: str, argv, run_dir, other, native: bool, timeout: int = 300):
  """Runs `python -m module` as processes 0 and 1 of one distributed run; returns their
  (return codes, logs).

  Process 0 gets `--workdir=run_dir`, process 1 `--workdir=other`, a folder of its own that
  it must neither create nor read (process 0 owns the workdir). With `native=False` kernel matrices take the XLA tile path, whose tiles go to the devices
  of both processes (as on a TPU pod slice); the native CPU kernel computes each matrix
  whole in every process.
  """
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JCONVRFM_NATIVE='1' if native else '0')
  procs = []
  for i, workdir in enumerate((run_dir, other)):
    cmd = [sys.executable, '-m', module, '--distributed', f'--coordinator_address=localhost:{port}',
           '--num_processes=2', f'--process_id={i}', '--jax_cpu_collectives_implementation=gloo',
           *argv, f'--workdir={workdir}']
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT))
  try:
    logs = [p.communicate(timeout=timeout)[0].decode() for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert not other.exists(), 'process 1 created its workdir'
  return [p.returncode for p in procs], logs


def _launch_ok(*args, **kwargs):
  """`_launch` that must succeed in both processes, with the same summary line; the logs."""
  codes, logs = _launch(*args, **kwargs)
  assert codes == [0, 0], [l[-3000:] for l in logs]
  assert _summary_line(logs[0]) == _summary_line(logs[1])
  return logs


def _summary_line(log: str) -> str:
  return next(l for l in log.splitlines() if l.startswith(('CNTK (round 0)', 'CNTK (depth')))


def test_convrfm_binary_on_two_processes_matches_one_and_only_process_0_writes(tmp_path,
                                                                              monkeypatch):
  monkeypatch.setenv('JCONVRFM_NATIVE', '0')
  ref_dir, run_dir, other = tmp_path / 'ref', tmp_path / 'run', tmp_path / 'process1'
  ref = exp.run(_values(exp.define_flags, TINY + [f'--workdir={ref_dir}']))
  # Both processes compute the same run, the one a single process computes.
  _launch_ok('experiments.convrfm', TINY, run_dir, other, native=False)
  summary = json.loads((run_dir / 'summary.json').read_text())
  assert summary['test_acc_per_round'] == ref['test_acc_per_round']
  assert summary['test_acc_fit_only_per_round'] == ref['test_acc_fit_only_per_round']
  assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in ref_dir.iterdir())
  assert_same_rounds(run_dir, ref_dir, 2)

  # Killed after round 0: both processes resume from process 0's files (process 1 has none).
  (run_dir / 'round_1.npz').unlink()
  before = (run_dir / 'round_0.npz').stat().st_mtime_ns
  logs = _launch_ok('experiments.convrfm', TINY, run_dir, other, native=False)
  for log in logs:
    assert 'Restored 1 finished round(s)' in log, log[-3000:]
  assert (run_dir / 'round_0.npz').stat().st_mtime_ns == before
  again = json.loads((run_dir / 'summary.json').read_text())
  assert again['test_acc_per_round'] == ref['test_acc_per_round']

  # Another configuration in the workdir: every process refuses it, not process 0 alone.
  codes, logs = _launch('experiments.convrfm', TINY + ['--power=1.0'], run_dir, other,
                        native=False)
  assert codes[0] != 0 and codes[1] != 0
  for log in logs:
    assert 'holds a run with a different configuration' in log, log[-3000:]


def test_deep_convrfm_binary_on_two_processes_matches_one(tmp_path):
  argv = ['--dataset=bars', '--n_train=16', '--n_test=8', '--q=3', '--depth=2', '--rounds=2',
          '--val_fraction=0.25', '--ridges=1e-6,1e-2', '--width=4']
  ref = deep_exp.run(_values(deep_exp.define_flags, argv + [f'--workdir={tmp_path / "ref"}']))
  run_dir, other = tmp_path / 'run', tmp_path / 'process1'
  _launch_ok('experiments.deep_convrfm', argv, run_dir, other, native=True)
  summary = json.loads((run_dir / 'summary.json').read_text())
  assert summary['deep_convrfm_test_acc'] == ref['deep_convrfm_test_acc']
  assert summary['layers'][0]['test_acc_per_round'] == ref['layers'][0]['test_acc_per_round']
  np.testing.assert_allclose(np.load(run_dir / 'layer0_filters.npy'),
                             np.load(tmp_path / 'ref' / 'layer0_filters.npy'),
                             rtol=1e-5, atol=1e-6)


def test_docstring_example():
  import doctest  # pylint: disable=g-import-not-at-top
  assert doctest.testmod(multihost).failed == 0


def _run_workers(tmp_path, *mode):
  """Runs `tests/multihost_worker.py` as processes 0 and 1 (two CPU devices each)."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'tests.multihost_worker', port, str(i), str(tmp_path), *mode],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in (0, 1)]
  try:
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [0, 0], [l[-3000:] for l in logs]


def test_block_loops_on_two_processes_split_the_work_and_match_one(tmp_path):
  """Every AGOP path, and the native kernel matrices, share their blocks out among
  processes and all-reduce the sums (`tests/multihost_worker.py`)."""
  _run_workers(tmp_path)
  r0, r1 = (dict(np.load(tmp_path / f'process{i}.npz')) for i in (0, 1))
  for r in (r0, r1):
    assert '`devices` must include a device of this process' in str(r['foreign_error'])
  labels = sorted(k[:-len('_spread')] for k in r0 if k.endswith('_spread'))
  # symmetric (2 and 4 devices), one-way, features, autodiff; native AGOP and matrices
  assert len(labels) >= 5, labels
  for label in labels:
    spread, alone = r0[f'{label}_spread'], r0[f'{label}_alone']
    # Both processes receive the same AGOP, bit for bit, and compute the same one alone.
    np.testing.assert_array_equal(spread, r1[f'{label}_spread'], err_msg=label)
    np.testing.assert_array_equal(alone, r1[f'{label}_alone'], err_msg=label)
    # Spread over processes only the summation order changes: float rounding (float32 for
    # the native path, 1e-6; 1e-10 in float64, where a lost or doubled block is O(1)).
    tol = 1e-6 if spread.dtype == np.float32 else 1e-10
    err = np.linalg.norm(spread - alone) / np.linalg.norm(alone)
    assert err < tol, (label, err)
    calls = [int(r[f'{label}_spread_calls']) for r in (r0, r1)]
    assert min(calls) > 0, (label, calls)     # both processes worked
    if label.startswith('kernel'):
      # Each entry comes from one process, in the same row chunk as alone: bitwise one
      # process's matrix.
      np.testing.assert_array_equal(spread, alone, err_msg=label)
    # The processes' block calls add up to one process's.
    assert sum(calls) == int(r0[f'{label}_alone_calls']), (label, calls)


def test_training_and_the_cnfa_agops_on_two_processes_match_one(tmp_path):
  """Data-parallel training over the devices of two processes, its resume from process 0's
  checkpoints, and the CNFA report's chunked AGOPs shared out among processes
  (`tests/multihost_worker.py`, mode `train`)."""
  _run_workers(tmp_path, 'train')
  r0, r1 = (dict(np.load(tmp_path / f'train{i}.npz')) for i in (0, 1))
  # Both processes hold the same results, bit for bit (same global steps, same all-reduces).
  assert sorted(r0) == sorted(r1)
  for key in r0:
    if not key.startswith('devices_') and not key.endswith('_calls'):
      np.testing.assert_array_equal(r0[key], r1[key], err_msg=key)
  # The default devices are one CPU device of each process; all4 spans both processes' two.
  assert len(r0['devices_spread']) == 2 and len(r0['devices_all4']) == 4
  assert len(r0['devices_alone']) == 1
  assert set(r0['devices_all4']) == set(r1['devices_all4'])
  n_leaves = sum(k.startswith('state_alone_') for k in r0)
  assert n_leaves > 10
  for label in ('spread', 'all4'):
    # The same global-batch steps as one device: float32 rounding only (as in train_test).
    np.testing.assert_allclose(r0[f'loss_{label}'], r0['loss_alone'], rtol=1e-6)
    np.testing.assert_array_equal(r0[f'eval_{label}'], r0['eval_alone'])
    for i in range(n_leaves):
      np.testing.assert_allclose(r0[f'state_{label}_{i}'], r0[f'state_alone_{i}'], rtol=0,
                                 atol=2e-6, err_msg=label)
  # Stopped after 4 steps and resumed from process 0's checkpoint: the same run, bitwise.
  for i in range(n_leaves):
    np.testing.assert_array_equal(r0[f'state_resumed_{i}'], r0[f'state_spread_{i}'])
  assert r0['loss_resumed'][-1] == r0['loss_spread'][-1]   # the last epoch, all after the resume
  assert int(r0['part_step']) == 4
  assert r0['resumed_history_epochs'].tolist() == [2, 3]
  # Process 0 alone wrote the workdir; process 1 never created its own.
  assert (tmp_path / 'workdir' / 'checkpoints').is_dir()
  assert len((tmp_path / 'workdir' / 'metrics.jsonl').read_text().splitlines()) == 3
  assert not (tmp_path / 'process1_workdir').exists()
  # Training on one device of its own, each process writes its own workdir.
  for i in (0, 1):
    assert (tmp_path / f'alone_workdir{i}' / 'checkpoints' / 'checkpoint_9.msgpack').is_file()
  # CNFA AGOPs: the same as one process's to float64 rounding; 6 chunks shared out.
  names = sorted(k[len('agop_alone_'):] for k in r0
                 if k.startswith('agop_alone_') and not k.endswith('_calls'))
  assert names == ['conv_0', 'conv_1']
  for label in ('default', 'all4'):
    for name in names:
      got, want = r0[f'agop_{label}_{name}'], r0[f'agop_alone_{name}']
      assert np.linalg.norm(got - want) <= 1e-12 * np.linalg.norm(want), (label, name)
    calls = [int(r[f'agop_{label}_calls']) for r in (r0, r1)]
    assert min(calls) > 0 and sum(calls) == int(r0['agop_alone_calls']) == 6, (label, calls)


def test_verify_ansatz_binary_on_two_processes_matches_one(tmp_path):
  """`verify_ansatz --distributed`: training over both processes' devices and the shared CNFA
  report give one process's results; process 0 alone writes. (A resume from process 0's
  checkpoint is tested bitwise in `test_training_and_the_cnfa_agops_on_two_processes_match_one`,
  the binary's resume rules in `verify_ansatz_test.py`, and another configuration failing in
  every process, the shared `multihost.prepare_workdir`, with the convrfm binary above.)"""
  from tests.verify_ansatz_test import _tiny  # pylint: disable=g-import-not-at-top
  train, test = _tiny(32, 0), _tiny(16, 1)
  npz = tmp_path / 'tiny.npz'
  np.savez(npz, x_train=train.images, y_train=train.labels, x_test=test.images,
           y_test=test.labels)
  settings = dict(model='vanilla', width=4, depth=2, init_scale=0.05, epochs=2, batch_size=8,
                  learning_rate=1e-2, agop_images=16, chunk_size=4, dataset=f'npz:{npz}',
                  train_split='train', test_split='test')
  argv = [f'--{k}={v}' for k, v in settings.items()]
  # The reference: the binary in one process on two of its devices (the run below: one device
  # of each of two processes, the same partitioned steps and two-term sums).
  subprocess.run([sys.executable, '-m', 'experiments.verify_ansatz', *argv, '--num_devices=2',
                  f'--workdir={tmp_path / "ref"}'], cwd=REPO, check=True, capture_output=True,
                 env=dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2'),
                 timeout=300)
  ref = json.loads((tmp_path / 'ref' / 'results.json').read_text())
  run_dir, other = tmp_path / 'run', tmp_path / 'process1'
  codes, logs = _launch('experiments.verify_ansatz', argv, run_dir, other, native=False)
  assert codes == [0, 0], [l[-3000:] for l in logs]
  got = json.loads((run_dir / 'results.json').read_text())
  assert got['processes'] == 2 and got['train_devices'] == 2   # a CPU device per process
  assert got['steps'] == ref['steps'] == 8
  assert got['test_accuracy'] == ref['test_accuracy']
  assert got['train_accuracy'] == ref['train_accuracy']
  assert sorted(p.name for p in run_dir.iterdir()) == sorted(
      p.name for p in (tmp_path / 'ref').iterdir())
  rep_ref = json.loads((tmp_path / 'ref' / 'cnfa.json').read_text())
  rep_got = json.loads((run_dir / 'cnfa.json').read_text())
  assert [l['name'] for l in rep_got] == ['conv_0', 'conv_1']
  assert rep_got == rep_ref
