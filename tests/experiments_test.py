"""Smoke tests: experiments/convrfm.py and experiments/deep_convrfm.py end to end, resume."""

import json

from absl import flags
import numpy as np
import pytest

from experiments import convrfm as exp
from experiments import deep_convrfm as deep_exp
from jconvrfm._src import convrfm as crfm

TINY = ['--dataset=bars', '--n_train=16', '--n_test=8', '--q=3', '--depth=1', '--rounds=2',
        '--val_fraction=0.25', '--ridges=1e-6,1e-2']


def _values(define, argv):
  fv = flags.FlagValues()
  define(fv)
  fv(['prog'] + argv)
  return fv


class _CountSteps:
  """Wraps `convrfm_step` to count how many rounds actually run."""

  def __init__(self, monkeypatch):
    self.calls = 0
    real = crfm.convrfm_step

    def counted(*args, **kwargs):
      self.calls += 1
      return real(*args, **kwargs)

    monkeypatch.setattr(crfm, 'convrfm_step', counted)


def test_convrfm_binary_end_to_end_and_resume(tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  argv = TINY + [f'--workdir={workdir}']
  summary = exp.run(_values(exp.define_flags, argv))
  for name in ('config.json', 'metrics.jsonl', 'round_0.npz', 'round_1.npz', 'summary.json',
               'eigenfilters_round0.png', 'eigenfilters_round1.png', 'filtered_round1.png'):
    assert (workdir / name).exists(), name
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [l['round'] for l in lines] == [0, 1]
  for l in lines:
    assert {'train_acc', 'val_acc', 'test_acc', 'test_mse', 'ridge', 'seconds'} <= set(l)
    assert set(l['seconds']) == {'kernel', 'solve', 'agop'}
  assert summary['test_acc_per_round'] == [l['test_acc'] for l in lines]
  with np.load(workdir / 'round_0.npz') as z:
    assert z['metric'].shape == (9, 9) and 'next_metric' in z.files

  # Killed after round 0: only round 1 is recomputed, and it matches the first run.
  (workdir / 'round_1.npz').unlink()
  before = (workdir / 'round_0.npz').stat().st_mtime_ns
  steps = _CountSteps(monkeypatch)
  again = exp.run(_values(exp.define_flags, argv))
  assert steps.calls == 1
  assert (workdir / 'round_0.npz').stat().st_mtime_ns == before
  assert again['test_acc_per_round'] == summary['test_acc_per_round']
  assert len((workdir / 'metrics.jsonl').read_text().splitlines()) == 2
  # Finished: nothing is recomputed.
  exp.run(_values(exp.define_flags, argv))
  assert steps.calls == 1

  with pytest.raises(ValueError, match='different configuration'):
    exp.run(_values(exp.define_flags, argv + ['--power=1.0']))


@pytest.mark.parametrize('argv,match', [
    (['--dataset=no_such_set'], 'unknown dataset'),
    (['--n_train=0'], 'n_train'),
    (['--keep_fraction=0'], 'keep_fraction'),
    (['--val_fraction=0'], 'No selection split'),
])
def test_convrfm_binary_fails_before_writing(tmp_path, argv, match):
  workdir = tmp_path / 'bad'
  with pytest.raises(ValueError, match=match):
    exp.run(_values(exp.define_flags, TINY + [f'--workdir={workdir}'] + argv))
  assert not workdir.exists()


@pytest.mark.parametrize('defect,extra,match', [
    ('nan', [], 'NaN'),
    ('label', [], 'label'),
    (None, ['--n_train=40'], 'fewer than'),
])
def test_convrfm_binary_rejects_bad_npz_data(tmp_path, defect, extra, match):
  path = tmp_path / 'data.npz'
  x = np.random.default_rng(0).uniform(size=(30, 8, 8, 1)).astype(np.float32)
  y = np.arange(30) % 3
  if defect == 'nan':
    x[0, 0, 0, 0] = np.nan
  if defect == 'label':
    y = y - 1
  np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=match):
    exp.run(_values(exp.define_flags,
                    TINY + [f'--workdir={workdir}', f'--dataset=npz:{path}', '--train_split=train']
                    + extra))
  assert not workdir.exists()


def test_deep_convrfm_binary_end_to_end_and_resume(tmp_path, monkeypatch):
  workdir = tmp_path / 'deep'
  argv = ['--dataset=bars', '--n_train=16', '--n_test=8', '--q=3', '--depth=2', '--rounds=2',
          '--val_fraction=0.25', '--ridges=1e-6,1e-2', '--width=4', f'--workdir={workdir}']
  summary = deep_exp.run(_values(deep_exp.define_flags, argv))
  for name in ('config.json', 'metrics.jsonl', 'summary.json', 'layer0_round_1.npz',
               'layer0_filters.npy', 'layer0_metric.npy', 'layer0_eigenfilters.png',
               'layer1_round_1.npz'):
    assert (workdir / name).exists(), name
  assert np.load(workdir / 'layer0_filters.npy').shape == (3, 3, 1, 4)
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [(l['layer'], l['round']) for l in lines] == [(0, 0), (0, 1), (1, 0), (1, 1)]
  assert summary['layers'][0]['features'] == [14, 14, 4]

  (workdir / 'layer1_round_1.npz').unlink()
  steps = _CountSteps(monkeypatch)
  again = deep_exp.run(_values(deep_exp.define_flags, argv))
  assert steps.calls == 1
  assert again['deep_convrfm_test_acc'] == summary['deep_convrfm_test_acc']
