"""Smoke tests: experiments/convrfm.py and experiments/deep_convrfm.py end to end, resume."""

import json

from absl import flags
import numpy as np
import pytest

from experiments import convrfm as exp
from experiments import deep_convrfm as deep_exp
from jconvrfm._src import convrfm as crfm

# Small enough to run in seconds, large enough that accuracies differ between seeds and rounds.
SEEDS_TASK = ['--dataset=bars', '--n_train=40', '--n_test=40', '--q=5', '--depth=1', '--rounds=2',
              '--val_fraction=0.25', '--ridges=1e-6,1e-2']
TINY = ['--dataset=bars', '--n_train=16', '--n_test=8', '--q=3', '--depth=1', '--rounds=2',
        '--val_fraction=0.25', '--ridges=1e-6,1e-2']


def _values(define, argv):
  fv = flags.FlagValues()
  define(fv)
  fv(['prog'] + argv)
  return fv


def assert_same_rounds(dir_a, dir_b, rounds: int, prefix: str = ''):
  """The learned arrays of `<prefix>round_<t>.npz` agree to float32 rounding in both folders."""
  for t in range(rounds):
    with np.load(dir_a / f'{prefix}round_{t}.npz') as a, \
         np.load(dir_b / f'{prefix}round_{t}.npz') as b:
      for k in ('metric', 'alpha', 'refit_alpha'):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=f'round {t} {k}')


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
    assert {'train_acc', 'val_acc', 'test_acc', 'test_mse', 'test_fit_only_acc',
            'test_fit_only_mse', 'ridge', 'seconds'} <= set(l)
    assert l['refit'] is True
    assert set(l['seconds']) == {'kernel', 'solve', 'agop'}
  assert summary['refit'] is True
  assert summary['test_acc_per_round'] == [l['test_acc'] for l in lines]
  assert summary['test_acc_fit_only_per_round'] == [l['test_fit_only_acc'] for l in lines]
  assert summary['cntk_test_acc'] == lines[0]['test_acc']
  assert summary['cntk_test_acc_fit_only'] == lines[0]['test_fit_only_acc']
  with np.load(workdir / 'round_0.npz') as z:
    assert z['metric'].shape == (9, 9) and 'next_metric' in z.files
    assert bool(z['refit']) and z['refit_alpha'].shape[0] == 16 and z['alpha'].shape[0] == 12
  with np.load(workdir / 'round_1.npz') as z:
    refit_alpha_1 = z['refit_alpha']

  # Killed after round 0: only round 1 is recomputed, and it matches the first run.
  (workdir / 'round_1.npz').unlink()
  before = (workdir / 'round_0.npz').stat().st_mtime_ns
  steps = _CountSteps(monkeypatch)
  again = exp.run(_values(exp.define_flags, argv))
  assert steps.calls == 1
  assert (workdir / 'round_0.npz').stat().st_mtime_ns == before
  assert again['test_acc_per_round'] == summary['test_acc_per_round']
  assert again['test_acc_fit_only_per_round'] == summary['test_acc_fit_only_per_round']
  with np.load(workdir / 'round_1.npz') as z:
    np.testing.assert_allclose(z['refit_alpha'], refit_alpha_1, rtol=1e-5, atol=1e-6)
  assert len((workdir / 'metrics.jsonl').read_text().splitlines()) == 2
  # Finished: nothing is recomputed.
  exp.run(_values(exp.define_flags, argv))
  assert steps.calls == 1

  with pytest.raises(ValueError, match='different configuration'):
    exp.run(_values(exp.define_flags, argv + ['--power=1.0']))
  with pytest.raises(ValueError, match=r"differs in \['convrfm.refit'\]"):
    exp.run(_values(exp.define_flags, argv + ['--norefit']))


def test_convrfm_binary_without_refit(tmp_path):
  workdir = tmp_path / 'norefit'
  summary = exp.run(_values(exp.define_flags, TINY + [f'--workdir={workdir}', '--norefit']))
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  for l in lines:
    assert l['refit'] is False and 'test_fit_only_acc' not in l
  assert summary['refit'] is False
  assert summary['test_acc_fit_only_per_round'] == summary['test_acc_per_round']
  with np.load(workdir / 'round_0.npz') as z:
    assert not bool(z['refit']) and 'refit_alpha' not in z.files


@pytest.mark.parametrize('kind, normalize', [('nngp', 'max'), ('ntk', 'none')])
def test_convrfm_binary_kind_and_normalize_reach_the_library(tmp_path, kind, normalize):
  argv = TINY + [f'--workdir={tmp_path}', f'--kind={kind}', f'--normalize={normalize}']
  values = _values(exp.define_flags, argv)
  summary = exp.run(values)
  saved = json.loads((tmp_path / 'config.json').read_text())['convrfm']
  assert (saved['kind'], saved['normalize']) == (kind, normalize)
  # The same run through the library directly, with the config spelled out by hand.
  train, test = exp.load_data('bars', 'train', 'test', 16, 8, 0, None, None)
  config = crfm.ConvRFMConfig(patch_size=3, depth=1, rounds=2, ridges=(1e-6, 1e-2),
                              val_fraction=0.25, kind=kind, normalize=normalize)
  state = crfm.convrfm_fit(train.images, train.labels, config=config,
                           num_classes=train.num_classes, x_test=test.images,
                           y_test=test.labels)
  assert summary['test_acc_per_round'] == [r.scores['test']['acc'] for r in state.history]
  with np.load(tmp_path / 'round_1.npz') as z:
    np.testing.assert_allclose(z['metric'], np.asarray(state.history[1].metric), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(z['alpha'], np.asarray(state.history[1].alpha), rtol=1e-5,
                               atol=1e-7)


def test_convrfm_binary_refuses_a_workdir_from_before_refit(tmp_path):
  workdir = tmp_path / 'old'
  argv = TINY + [f'--workdir={workdir}', '--rounds=1']
  exp.run(_values(exp.define_flags, argv))
  config = json.loads((workdir / 'config.json').read_text())
  # A round file of the old format (no refit fields) is refused, not silently misread.
  with np.load(workdir / 'round_0.npz') as z:
    old = {k: z[k] for k in z.files if k not in ('refit', 'refit_alpha', 'refit_jitter')}
  np.savez(workdir / 'round_0.npz', **old)
  with pytest.raises(ValueError, match='older version without the refit fields'):
    exp.run(_values(exp.define_flags, argv))
  # So is a config.json without the refit setting.
  del config['convrfm']['refit']
  (workdir / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match='lacks .*convrfm.refit.*older version'):
    exp.run(_values(exp.define_flags, argv))


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
  assert summary['refit'] is True
  assert summary['cntk_test_acc'] == lines[0]['test_acc']
  assert summary['cntk_test_acc_fit_only'] == lines[0]['test_fit_only_acc']
  assert again['deep_convrfm_test_acc_fit_only'] == summary['deep_convrfm_test_acc_fit_only']


def test_deep_convrfm_final_rounds(tmp_path):
  """`--final_rounds=1`: the final kernel on the learned features is plain CNTK regression."""
  workdir = tmp_path / 'deep_final'
  argv = ['--dataset=bars', '--n_train=16', '--n_test=8', '--q=3', '--depth=2', '--rounds=2',
          '--final_rounds=1', '--val_fraction=0.25', '--ridges=1e-6,1e-2', '--width=4',
          '--nonlinearity=relu', f'--workdir={workdir}']
  summary = deep_exp.run(_values(deep_exp.define_flags, argv))
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [(l['layer'], l['round']) for l in lines] == [(0, 0), (0, 1), (1, 0)]
  assert summary['final_test_acc_per_round'] == [lines[-1]['test_acc']]
  assert json.loads((workdir / 'config.json').read_text())['final_rounds'] == 1
  with pytest.raises(ValueError, match='final_rounds'):
    deep_exp.run(_values(deep_exp.define_flags,
                         argv[:-1] + ['--final_rounds=0', f'--workdir={tmp_path / "bad"}']))
  assert not (tmp_path / 'bad').exists()


def test_deep_convrfm_filter_seed_keeps_data_and_layer0_and_redraws_the_filters(tmp_path):
  from jconvrfm._src import deep_convrfm as deep  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  argv = ['--dataset=bars', '--n_train=16', '--n_test=8', '--q=3', '--depth=2', '--rounds=2',
          '--final_rounds=1', '--val_fraction=0.25', '--ridges=1e-6,1e-2', '--width=4',
          '--nonlinearity=relu']
  runs = {}
  for name, extra in (('default', []), ('fs0', ['--filter_seed=0']), ('fs1', ['--filter_seed=1'])):
    workdir = tmp_path / name
    runs[name] = deep_exp.run(_values(deep_exp.define_flags, argv + extra +
                                      [f'--workdir={workdir}']))
    runs[name + '_lines'] = [json.loads(l) for l in
                             (workdir / 'metrics.jsonl').read_text().splitlines()]
    runs[name + '_filters'] = np.load(workdir / 'layer0_filters.npy')
    runs[name + '_config'] = json.loads((workdir / 'config.json').read_text())
  drop = lambda l: {k: v for k, v in l.items() if k not in ('seconds', 'peak_rss_mb')}
  layer0 = lambda name: [drop(l) for l in runs[name + '_lines'] if l['layer'] == 0]
  # --filter_seed=0 is the default run (--seed=0); its config records the flag.
  np.testing.assert_array_equal(runs['fs0_filters'], runs['default_filters'])
  assert runs['fs0']['deep_convrfm_test_acc'] == runs['default']['deep_convrfm_test_acc']
  assert 'filter_seed' not in runs['default_config']
  assert runs['fs0_config']['filter_seed'] == 0
  # --filter_seed=1: the same images and layer 0, filters drawn with PRNGKey(1)'s first split.
  assert layer0('fs1') == layer0('default')
  metric = np.load(tmp_path / 'fs1' / 'layer0_metric.npy')
  expected = deep.sample_filters(jax.numpy.asarray(metric), 4,
                                 jax.random.split(jax.random.PRNGKey(1))[1], patch_size=3,
                                 channels=1)
  np.testing.assert_allclose(runs['fs1_filters'], np.asarray(expected), rtol=1e-6, atol=1e-7)
  assert not np.allclose(runs['fs1_filters'], runs['default_filters'])
  with pytest.raises(ValueError, match='different configuration'):
    deep_exp.run(_values(deep_exp.define_flags, argv + [f'--workdir={tmp_path / "fs1"}']))
  with pytest.raises(ValueError, match='--filter_seed must be'):
    deep_exp.run(_values(deep_exp.define_flags,
                         argv + ['--filter_seed=-2', f'--workdir={tmp_path / "bad"}']))
  assert not (tmp_path / 'bad').exists()


def test_deep_convrfm_layer0_from_copies_layer0_and_matches_recomputing_it(tmp_path,
                                                                             monkeypatch):
  argv = ['--dataset=bars', '--n_train=16', '--n_test=8', '--q=3', '--depth=2', '--rounds=2',
          '--final_rounds=1', '--val_fraction=0.25', '--ridges=1e-6,1e-2', '--width=4',
          '--nonlinearity=relu']
  run = lambda extra: deep_exp.run(_values(deep_exp.define_flags, argv + extra))
  source = tmp_path / 'source'
  run([f'--workdir={source}'])
  # The reference: filter seed 1 and width 6, everything recomputed.
  other = ['--filter_seed=1', '--width=6']
  full = run(other + [f'--workdir={tmp_path / "full"}'])
  steps = _CountSteps(monkeypatch)
  reused = run(other + [f'--workdir={tmp_path / "reused"}', f'--layer0_from={source}'])
  assert steps.calls == 1           # only the final ConvRFM's one round ran
  for key in ('cntk_test_acc', 'deep_convrfm_test_acc', 'deep_convrfm_test_acc_fit_only',
              'final_test_acc_per_round', 'layers'):
    assert reused[key] == full[key], key
  assert reused['layer0_from'] == str(source)
  np.testing.assert_array_equal(np.load(tmp_path / 'reused' / 'layer0_filters.npy'),
                                np.load(tmp_path / 'full' / 'layer0_filters.npy'))
  drop = lambda text: [{k: v for k, v in json.loads(l).items()
                        if k not in ('seconds', 'peak_rss_mb')} for l in text.splitlines()]
  assert (drop((tmp_path / 'reused' / 'metrics.jsonl').read_text()) ==
          drop((tmp_path / 'full' / 'metrics.jsonl').read_text()))
  # Resuming the reused run copies nothing more and runs nothing.
  steps.calls = 0
  again = run(other + [f'--workdir={tmp_path / "reused"}', f'--layer0_from={source}'])
  assert steps.calls == 0 and again['deep_convrfm_test_acc'] == full['deep_convrfm_test_acc']
  # Layer-0 settings must match; the error comes before anything is written.
  for extra, match in ((['--rounds=3'], 'differs in .*convrfm.rounds'),
                       (['--seed=1'], 'differs in .*seed'),
                       (['--layers=0'], 'at least one learned layer')):
    with pytest.raises(ValueError, match=match):
      run(extra + [f'--workdir={tmp_path / "bad"}', f'--layer0_from={source}'])
    assert not (tmp_path / 'bad').exists()
  with pytest.raises(ValueError, match='no config.json'):
    run([f'--workdir={tmp_path / "bad"}', f'--layer0_from={tmp_path / "nowhere"}'])
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'config.json').write_text((source / 'config.json').read_text())
  with pytest.raises(ValueError, match='no finished layer-0 round'):
    run([f'--workdir={tmp_path / "bad"}', f'--layer0_from={tmp_path / "empty"}'])
  assert not (tmp_path / 'bad').exists()


def test_binary_main_takes_jax_flags_and_fills_the_compilation_cache(tmp_path):
  """`python -m experiments.convrfm` accepts jax's options as flags (`config_with_absl`)."""
  import os  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  cache = tmp_path / 'xla_cache'
  repo = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, PYTHONPATH=str(repo))
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.convrfm', f'--workdir={tmp_path / "run"}', *TINY,
       f'--jax_compilation_cache_dir={cache}', '--jax_persistent_cache_min_compile_time_secs=0'],
      cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert (tmp_path / 'run' / 'summary.json').exists()
  assert cache.is_dir() and any(cache.iterdir()), 'no compiled program was cached'


@pytest.mark.parametrize('user_flags', ['', '--xla_cpu_prefer_vector_width=256'])
def test_use_jax_flags_sets_cpu_vector_width_unless_the_user_did(user_flags, tmp_path):
  """AVX-512 CPUs get 512-bit vectors; a user's own setting wins; the backend accepts it."""
  import os  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  repo = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, PYTHONPATH=str(repo), XLA_FLAGS=user_flags,
             XDG_CACHE_HOME=str(tmp_path / 'xdg'))
  script = ('import os, experiments, jax.numpy as jnp\n'
            'experiments.use_jax_flags()\n'
            'print(float(jnp.sum(jnp.arange(4.0))))\n'
            'print(os.environ["XLA_FLAGS"])\n')
  out = subprocess.run([sys.executable, '-c', script], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  total, flags = out.stdout.strip().splitlines()[-2:]
  assert float(total) == 6.0
  try:
    cpu_flags = pathlib.Path('/proc/cpuinfo').read_text()
  except OSError:
    cpu_flags = ''
  avx512 = any(l.startswith('flags') and 'avx512f' in l.split() for l in cpu_flags.splitlines())
  if user_flags:
    assert flags == user_flags
  else:
    assert flags == ('--xla_cpu_prefer_vector_width=512' if avx512 else '')


@pytest.mark.parametrize('disable', [False, True])
def test_binaries_cache_compiled_programs_by_default(tmp_path, disable):
  """Without cache flags a binary fills `$XDG_CACHE_HOME/jconvrfm/jax`; the jax flag turns it off."""
  import os  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from jconvrfm._src.kernels import native  # pylint: disable=g-import-not-at-top
  repo = pathlib.Path(__file__).resolve().parents[1]
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_')}
  # A fresh XDG cache for jax's programs, but the native kernel library already built (it
  # would otherwise be compiled again under the new XDG folder).
  env.update(PYTHONPATH=str(repo), XDG_CACHE_HOME=str(tmp_path / 'xdg'),
             JCONVRFM_CACHE_DIR=str(native.cache_dir()))
  extra = ['--nojax_enable_compilation_cache'] if disable else []
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.convrfm', f'--workdir={tmp_path / "run"}', *TINY,
       *extra], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  cache = tmp_path / 'xdg' / 'jconvrfm' / 'jax'
  entries = list(cache.iterdir()) if cache.is_dir() else []
  if disable:
    assert not entries
    return
  # Every program is cached (minimum compile time 0), the small eager ones included.
  assert len(entries) > 20, len(entries)
  # Without `JAX_*` variables the binary compiled fully optimised machine code, which the rest
  # of the suite does not (`JAX_DISABLE_MOST_OPTIMIZATIONS`, conftest.py): the same run here
  # must agree with it to float32 rounding.
  here = exp.run(_values(exp.define_flags, TINY + [f'--workdir={tmp_path / "here"}']))
  there = json.loads((tmp_path / 'run' / 'summary.json').read_text())
  assert there['test_acc_per_round'] == here['test_acc_per_round']
  assert_same_rounds(tmp_path / 'run', tmp_path / 'here', 2)


def test_convrfm_seeds_matches_single_runs_summarises_and_resumes(tmp_path, monkeypatch):
  from experiments import convrfm_seeds as seeds_exp  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'seeds'
  argv = SEEDS_TASK + [f'--workdir={workdir}', '--seeds=0-2', '--protocols=default,reference',
                       '--min_gain=5']
  summary = seeds_exp.run(_values(seeds_exp.define_flags, argv))
  lines = [json.loads(l) for l in (workdir / 'runs.jsonl').read_text().splitlines()]
  assert sorted((l['seed'], l['protocol']) for l in lines) == [
      (s, p) for s in range(3) for p in ('default', 'reference')]
  # Every line is what experiments/convrfm.py computes with that --seed (--select_on_test).
  for seed, protocol, extra in ((1, 'default', []), (0, 'reference', ['--select_on_test'])):
    single = exp.run(_values(exp.define_flags, SEEDS_TASK + [
        f'--workdir={tmp_path / f"single_{seed}"}', f'--seed={seed}'] + extra))
    line = next(l for l in lines if (l['seed'], l['protocol']) == (seed, protocol))
    assert line['test_acc'] == single['test_acc_per_round']
    assert line['test_fit_only_acc'] == single['test_acc_fit_only_per_round']
    assert line['selection_acc'] == single['val_acc_per_round']
    assert line['best_round'] == single['best_round']
  # The summary's statistics, recomputed from the lines.
  final = {}
  for protocol in ('default', 'reference'):
    acc = 100 * np.array([l['test_acc'] for l in lines if l['protocol'] == protocol])
    s = summary[protocol]
    np.testing.assert_allclose(s['test_acc_mean'], acc.mean(axis=0))
    np.testing.assert_allclose(s['test_acc_sd'], acc.std(axis=0, ddof=1))
    gains = acc[:, -1] - acc[:, 0]
    assert s['gain_mean'] == pytest.approx(gains.mean())
    assert (s['gain_min'], s['gain_max']) == pytest.approx((gains.min(), gains.max()))
    assert s['seeds_with_min_gain'] == int((gains >= 5 - 1e-9).sum())
    final[protocol] = acc[:, -1]
  assert summary['paired_last_round']['mean'] == pytest.approx(
      (final['default'] - final['reference']).mean())
  assert json.loads((workdir / 'summary.json').read_text()) == json.loads(json.dumps(summary))

  # A lost line is recomputed alone (2 rounds), equal to the first time; more seeds add only
  # their own runs; a finished study recomputes nothing.
  lost = next(l for l in lines if (l['seed'], l['protocol']) == (1, 'reference'))
  (workdir / 'runs.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines
                                              if l is not lost))
  steps = _CountSteps(monkeypatch)
  again = seeds_exp.run(_values(seeds_exp.define_flags, argv))
  assert steps.calls == 2
  redone = [json.loads(l) for l in (workdir / 'runs.jsonl').read_text().splitlines()][-1]
  assert (redone['seed'], redone['protocol'], redone['test_acc']) == (1, 'reference',
                                                                      lost['test_acc'])
  assert again == summary
  more = seeds_exp.run(_values(seeds_exp.define_flags,
                               [a for a in argv if not a.startswith('--seeds')] +
                               ['--seeds=0-3']))
  assert steps.calls == 2 + 4 and more['default']['runs'] == 4
  seeds_exp.run(_values(seeds_exp.define_flags, argv))
  assert steps.calls == 6
  with pytest.raises(ValueError, match='different configuration'):
    seeds_exp.run(_values(seeds_exp.define_flags, argv + ['--power=1.0']))


@pytest.mark.parametrize('argv,match', [
    (['--seeds=3-1'], 'empty or negative'),
    (['--seeds=a'], '--seeds must be'),
    (['--seeds=0,1-2,2'], 'twice'),
    (['--seed=1'], 'use --seeds'),
    (['--select_on_test'], '--protocols=reference'),
    (['--protocols=default,test'], '--protocols must be'),
    (['--n_test=0'], '--n_test must be >= 1'),
    (['--val_fraction=0'], 'No selection split'),
    (['--dataset=no_such_set'], 'unknown dataset'),
])
def test_convrfm_seeds_fails_before_writing(tmp_path, argv, match):
  from experiments import convrfm_seeds as seeds_exp  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'bad'
  with pytest.raises(ValueError, match=match):
    seeds_exp.run(_values(seeds_exp.define_flags, TINY + [f'--workdir={workdir}'] + argv))
  assert not workdir.exists()
