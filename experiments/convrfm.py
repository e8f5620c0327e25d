r"""ConvRFM on a dataset picked by name: CNTK (round 0) vs learned patch metric, resumable.

Writes to `--workdir`:

* `config.json`: the run's data and ConvRFM settings (a rerun in the same workdir must match,
  else it refuses);
* `metrics.jsonl`: one JSON line per round: train/val/test accuracy and MSE of the chosen
  ridge, the chosen ridge and its Cholesky jitter, every ridge's scores, seconds in kernels,
  solve and AGOP, and the peak resident memory so far. With `--refit` (default) `test_acc` /
  `test_mse` are the predictor refitted on fit + validation images with the chosen ridge, and
  `test_fit_only_acc` / `test_fit_only_mse` those of the fit-only predictor (the one whose AGOP
  gives the next metric); train and val scores are always the fit-only predictor's;
* `round_<t>.npz`: the metric `M_t`, the AGOP, `M_{t+1}`, alpha, the refit alpha and the kernel
  scale of round t (written atomically: temp file + rename; a killed run resumes after its
  last finished round; a workdir written before refit existed is refused with a message);
* `eigenfilters_round<t>.png`: the top-8 eigenvectors of `M_t` as q x q (x c) filters;
  `filtered_round<t>.png`: a sample image filtered by `M_t` and by its leading eigenvectors;
* `summary.json`: CNTK (round 0) vs ConvRFM test accuracy (refit, and fit-only), selected
  round, total seconds.

With no flags it runs the embedded "star" local-signal task (q = 11, one kernel layer, 50
training images of which 20% are held out for selection) in about a minute on a 2-core CPU:

  python -m experiments.convrfm --workdir=/tmp/convrfm_star

Noisy MNIST (42 x 42, sigma = 1), 1000 training images (20% validation), 1000 test images:

  python -m experiments.convrfm --workdir=/tmp/convrfm_nmnist --dataset=noisy_mnist \
    --train_split='train[:1000]' --test_split='test[:1000]' --manual_dir=../shared/data/mnist \
    --tfds_data_dir=/tmp/tfds --q=3 --depth=3 --rounds=4

The reference protocol (ridge and round chosen on the test set) is `--select_on_test`; it is
logged as a warning and recorded in config.json.

On a TPU pod slice, start the same command on every host with `--distributed` (see
`experiments/multihost.py`): kernel matrices are spread over every chip of every host, and
process 0 alone writes the workdir.

References:
  D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
  convolutional neural networks. arXiv:2309.00570, 2023.
"""

import functools
import json
import pathlib
import resource
import time
from typing import Any, Dict, Optional, Tuple

from absl import app
from absl import flags
from absl import logging
import jax.numpy as jnp
import numpy as np
import tqdm

import experiments
from experiments import multihost
from jconvrfm._src import convrfm as crfm

FLAGS = flags.FLAGS

SYNTHETIC = ('star', 'bars', 'toy_1d')


class _Definer:
  """`define.string(...)` = `flags.DEFINE_string(..., flag_values=flag_values)`."""

  def __init__(self, flag_values):
    self.flag_values = flag_values

  def __getattr__(self, kind):
    return functools.partial(getattr(flags, 'DEFINE_' + kind), flag_values=self.flag_values)


def define_flags(flag_values=FLAGS):
  """Flags shared by `convrfm` and `deep_convrfm`, defined on `flag_values`."""
  define = _Definer(flag_values)
  define.string('workdir', None, 'Output directory (created; resumed if it exists); '
                'default: a new temporary directory.')
  define.string('dataset', 'star', 'Dataset spec for jconvrfm.data.load (a name such as '
                'star, noisy_mnist, mnist, or folder:<path>, npz:<path>, tfds:<name>).')
  define.string('train_split', 'train', 'Split string of the training data.')
  define.string('test_split', 'test', 'Split string of the test data; if equal to '
                '--train_split, one load is split into disjoint train/test parts.')
  define.integer('n_train', 50, 'Training images (validation is carved from them).')
  define.integer('n_test', 1000, 'Test images.')
  define.float('val_fraction', 0.2, 'Fraction of the training images used to select '
               'the ridge and the round.')
  define.integer('q', 11, 'Patch size.')
  define.integer('depth', 1, 'CNTK depth.')
  define.enum('padding', 'VALID', ['VALID', 'SAME', 'CIRCULAR'], 'Padding.')
  define.enum('kind', 'ntk', ['ntk', 'nngp'], 'CNTK output: the NTK (the paper) or the NNGP.')
  define.enum('normalize', 'max', ['max', 'none'], 'Kernel scaling: divide by max K_train '
              '(the reference) or none.')
  define.integer('rounds', 2, 'Ridge fits (round 0 = CNTK, then one per metric update).')
  define.list('ridges', ['1e-8', '1e-5', '1e-3'], 'Ridge grid.')
  define.integer('agop_samples', 0, 'Training images in the AGOP (0: all).')
  define.float('power', 0.5, 'S = G^power, M = S^2.')
  define.float('keep_fraction', 1.0, 'Fraction of the spectrum of S kept ("thresh").')
  define.enum('dtype', 'float32', ['float32', 'float64'], 'Computation dtype.')
  define.bool('select_on_test', False, 'Reference protocol: select on the TEST set.')
  define.bool('refit', True, 'Refit the chosen ridge on fit + validation images for the test '
              'scores and predictions (the metric still comes from the fit-only predictor).')
  define.integer('seed', 0, 'Seed of data generation, splits and AGOP samples.')
  define.string('tfds_data_dir', None, 'tfds data_dir (cache of prepared datasets).')
  define.string('manual_dir', None, 'tfds manual_dir (e.g. ../shared/data/mnist).')
  define.integer('kernel_block_size', 0, 'Kernel tile side (0: the tiler decides).')
  multihost.define_flags(flag_values)


# ----------------------------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------------------------


def _loader_kwargs(spec: str, n: int, seed: int, data_dir, manual_dir) -> Dict[str, Any]:
  """Keyword arguments each family of `jconvrfm.data.load` specs accepts."""
  if spec in SYNTHETIC:
    return dict(n=n, seed=seed)
  tfds_kw = {k: v for k, v in (('data_dir', data_dir), ('manual_dir', manual_dir)) if v}
  if spec == 'noisy_mnist':
    return dict(seed=seed, **tfds_kw)
  if spec.partition(':')[0] in ('folder', 'npz'):
    return {}
  return tfds_kw


def load_data(spec: str, train_split: str, test_split: str, n_train: int, n_test: int,
              seed: int, data_dir: Optional[str] = None, manual_dir: Optional[str] = None):
  """Returns `(train, test)` `jconvrfm.data.Dataset`s of exactly n_train / n_test images.

  Raises ValueError (unknown dataset, too few images, bad labels or pixels) before anything
  is written.
  """
  from jconvrfm import data  # pylint: disable=g-import-not-at-top
  if n_train < 1 or n_test < 0:
    raise ValueError(f'--n_train must be >= 1 and --n_test >= 0, got {n_train}, {n_test}.')
  if train_split == test_split:
    full = data.load(spec, train_split,
                     **_loader_kwargs(spec, n_train + n_test, seed, data_dir, manual_dir))
    parts = data.split(full, [n_train, n_test] if n_test else [n_train], seed=seed)
    train, test = parts[0], (parts[1] if n_test else None)
  else:
    train = data.load(spec, train_split,
                      **_loader_kwargs(spec, n_train, seed, data_dir, manual_dir))
    test = data.load(spec, test_split,
                     **_loader_kwargs(spec, n_test, seed, data_dir, manual_dir)) if n_test else None
  out = []
  for name, ds, n in (('train', train, n_train), ('test', test, n_test)):
    if ds is None:
      out.append(None)
      continue
    ds = data.check_dataset(ds, name)
    if ds.labels.shape[0] < n:
      raise ValueError(f'The {name} split {spec!r} has {ds.labels.shape[0]} images, fewer '
                       f'than the {n} asked for.')
    out.append(data.Dataset(ds.images[:n], ds.labels[:n], ds.num_classes))
  return tuple(out)


# ----------------------------------------------------------------------------------------------
# Workdir: config check, resume.
# ----------------------------------------------------------------------------------------------


def _record_to_arrays(rec: crfm.RoundRecord) -> Dict[str, np.ndarray]:
  """A round's arrays and scores for `round_<t>.npz` (`refit` marks the current format)."""
  out = dict(metric=np.asarray(rec.metric), alpha=np.asarray(rec.alpha),
             kernel_scale=np.asarray(rec.kernel_scale), ridge=np.asarray(rec.ridge),
             jitter=np.asarray(rec.jitter), round=np.asarray(rec.round),
             refit=np.asarray(rec.refit_alpha is not None),
             refit_jitter=np.asarray(rec.refit_jitter),
             extra=np.asarray(json.dumps({'scores': rec.scores,
                                          'ridge_scores': list(rec.ridge_scores),
                                          'seconds': rec.seconds})))
  if rec.refit_alpha is not None:
    out['refit_alpha'] = np.asarray(rec.refit_alpha)
  if rec.next_metric is not None:
    out['next_metric'] = np.asarray(rec.next_metric)
    out['agop'] = np.asarray(rec.agop)
  return out


def _record_from_npz(z: Dict[str, np.ndarray], path: pathlib.Path, dtype) -> crfm.RoundRecord:
  """A `round_<t>.npz`'s arrays `z` as a record; raises ValueError for one written before
  refit existed (`path` names the file in messages)."""
  if 'refit' not in z:
    raise ValueError(f'{path} was written by an older version without the refit fields '
                     '(refit, refit_alpha); resume it with that version or use a new '
                     '--workdir.')
  extra = json.loads(str(z['extra']))
  has_next = 'next_metric' in z
  has_refit = bool(z['refit'])
  return crfm.RoundRecord(
      round=int(z['round']), metric=jnp.asarray(z['metric'], dtype), ridge=float(z['ridge']),
      jitter=float(z['jitter']), alpha=jnp.asarray(z['alpha'], dtype),
      kernel_scale=float(z['kernel_scale']), scores=extra['scores'],
      ridge_scores=tuple(extra['ridge_scores']), seconds=extra['seconds'],
      next_metric=jnp.asarray(z['next_metric'], dtype) if has_next else None,
      agop=jnp.asarray(z['agop'], dtype) if has_next else None,
      refit_alpha=jnp.asarray(z['refit_alpha'], dtype) if has_refit else None,
      refit_jitter=float(z['refit_jitter']))


def restore_rounds(state: crfm.ConvRFMState, wd: multihost.Workdir,
                   prefix: str = '') -> Tuple[crfm.ConvRFMState, list]:
  """Loads finished rounds `<prefix>round_<t>.npz` into `state`; returns (state, metric lines).

  In a multi-process run every process receives process 0's files, so all resume alike.
  """
  history, lines = [], []
  saved = (wd.read_text(f'{prefix}metrics.jsonl') or '').splitlines()
  while True:
    t = len(history)
    name = f'{prefix}round_{t}.npz'
    z = wd.load_npz(name)
    if z is None:
      break
    rec = _record_from_npz(z, wd / name, state.config.dtype)
    if (rec.refit_alpha is not None) != state.refits:
      raise ValueError(f'{wd / name} was written with refit '
                       f'{rec.refit_alpha is not None} but this run has refit {state.refits}; '
                       'use a new --workdir.')
    if rec.next_metric is None and t + 1 < state.config.rounds:
      break  # a last round written without its update cannot be continued
    history.append(rec)
    if t < len(saved):
      lines.append(saved[t])
  if not history:
    return state, []
  last = history[-1]
  logging.info('Restored %d finished round(s) from %s.', len(history), wd)
  return state._replace(history=tuple(history),
                        next_metric=last.next_metric if last.next_metric is not None
                        else last.metric), lines


def metrics_line(rec: crfm.RoundRecord, **extra) -> Dict[str, Any]:
  """One metrics.jsonl entry: `<split>_acc`, `<split>_mse` for every scored split ('test' is
  the refit predictor's when `refit`, with the fit-only one as 'test_fit_only')."""
  line = dict(extra, round=rec.round, ridge=rec.ridge, jitter=rec.jitter,
              refit=rec.refit_alpha is not None, refit_jitter=rec.refit_jitter,
              seconds=rec.seconds, ridge_scores=list(rec.ridge_scores),
              peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  for split, sc in rec.scores.items():
    line[f'{split}_acc'] = sc['acc']
    line[f'{split}_mse'] = sc['mse']
  return line


# ----------------------------------------------------------------------------------------------
# Figures.
# ----------------------------------------------------------------------------------------------


def _minmax(a):
  a = np.asarray(a, np.float64)
  lo, hi = a.min(), a.max()
  return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _as_image(a):
  """(h, w, c) -> something imshow shows: grey for c != 3 (norm over channels), RGB for 3."""
  if a.shape[-1] == 3:
    return _minmax(a), None
  if a.shape[-1] == 1:
    return _minmax(a[..., 0]), 'gray'
  return _minmax(np.linalg.norm(a, axis=-1)), 'gray'


def plot_eigenfilters(metric, q: int, channels: int, wd: multihost.Workdir, name: str,
                      title: str = ''):
  """Top-8 eigenvectors of `metric` as q x q (x c) filters, min-max scaled, to `wd / name`."""
  if not multihost.is_writer():
    return
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  e, u = np.linalg.eigh(np.asarray(metric, np.float64))
  k = min(8, len(e))
  fig, axes = plt.subplots(1, k, figsize=(1.6 * k, 1.9))
  for j, ax in enumerate(np.atleast_1d(axes)):
    img, cmap = _as_image(u[:, -1 - j].reshape(q, q, channels))
    ax.imshow(img, cmap=cmap, interpolation='nearest')
    ax.set_title(f'{e[-1 - j] / max(e[-1], 1e-30):.2f}', fontsize=8)
    ax.axis('off')
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  wd.save_figure(name, fig, dpi=100)


def plot_filtered(image, metric, q: int, padding: str, wd: multihost.Workdir, name: str,
                  title: str = ''):
  """A sample image filtered by `metric` (per patch `S p`, norm over each channel's q x q
  block) and by its three leading eigenvectors (`(u^T p) u`, same norm), to `wd / name`."""
  if not multihost.is_writer():
    return
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from jconvrfm._src import cnfa  # pylint: disable=g-import-not-at-top
  from jconvrfm._src import patches as patches_lib  # pylint: disable=g-import-not-at-top
  image = np.asarray(image, np.float64)
  c = image.shape[-1]
  metric = np.asarray(metric, np.float64)
  p = np.asarray(patches_lib.patches(jnp.asarray(image[None]), q, padding=padding))[0]
  s = np.asarray(cnfa.sqrt_psd(jnp.asarray(metric)))
  h, w, d = p.shape

  def block_norm(v):  # (h, w, d) -> (h, w, c): norm over each channel's q x q block
    return np.linalg.norm(v.reshape(h, w, q * q, c), axis=2)

  panels = [('image', image), ('S p', block_norm(p @ s))]
  e, u = np.linalg.eigh(metric)
  for j in range(min(3, d)):
    vec = u[:, -1 - j]
    panels.append((f'eigvec {j + 1}', block_norm((p @ vec)[..., None] * vec)))
  fig, axes = plt.subplots(1, len(panels), figsize=(2.0 * len(panels), 2.3))
  for ax, (label, a) in zip(axes, panels):
    img, cmap = _as_image(a)
    ax.imshow(img, cmap=cmap, interpolation='nearest')
    ax.set_title(label, fontsize=8)
    ax.axis('off')
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  wd.save_figure(name, fig, dpi=100)


# ----------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------


def config_from_flags(values) -> crfm.ConvRFMConfig:
  return crfm.ConvRFMConfig(
      patch_size=values.q, depth=values.depth, padding=values.padding,
      kind=values.kind, normalize=values.normalize, rounds=values.rounds,
      ridges=tuple(float(r) for r in values.ridges),
      agop_samples=values.agop_samples or None, power=values.power,
      keep_fraction=values.keep_fraction, dtype=values.dtype, val_fraction=values.val_fraction,
      select_on_test=values.select_on_test, refit=values.refit, seed=values.seed,
      kernel_block_size=values.kernel_block_size or None)


def data_config(values) -> Dict[str, Any]:
  return dict(dataset=values.dataset, train_split=values.train_split,
              test_split=values.test_split, n_train=values.n_train, n_test=values.n_test,
              seed=values.seed)


class _Progress:
  """tqdm bars for kernel tiles and AGOP samples, one per phase and round."""

  def __init__(self, label):
    self.label, self.bars = label, {}

  def __call__(self, phase, done, total):
    bar = self.bars.get(phase)
    if bar is None:
      bar = self.bars[phase] = tqdm.tqdm(total=total, desc=f'{self.label} {phase}',
                                         leave=False, disable=not multihost.is_writer())
    bar.update(done - bar.n)
    if done >= total:
      bar.close()
      del self.bars[phase]


def run_rounds(state: crfm.ConvRFMState, wd: multihost.Workdir, *, prefix: str = '',
               sample_image=None, line_extra: Optional[Dict[str, Any]] = None,
               figures: bool = True) -> crfm.ConvRFMState:
  """Runs the remaining rounds of `state`, writing `<prefix>round_<t>.npz`, the metrics lines
  and figures after each round; finished rounds found in `wd` are restored first."""
  state, lines = restore_rounds(state, wd, prefix)
  cfg = state.config
  c = state.x_fit.shape[-1]
  while not state.done:
    t = len(state.history)
    state = crfm.convrfm_step(state, progress=_Progress(f'{prefix}round {t}'))
    rec = state.history[-1]
    lines.append(json.dumps(metrics_line(rec, **(line_extra or {})), sort_keys=True))
    if figures:
      plot_eigenfilters(rec.metric, cfg.patch_size, c, wd, f'{prefix}eigenfilters_round{t}.png',
                        f'{prefix}round {t}: top eigenvectors of M')
      if sample_image is not None:
        plot_filtered(sample_image, rec.metric, cfg.patch_size, cfg.padding, wd,
                      f'{prefix}filtered_round{t}.png', f'{prefix}round {t}')
    # The npz is the commit point of the round: metrics first, then the round file.
    wd.write_text(f'{prefix}metrics.jsonl', '\n'.join(lines) + '\n')
    wd.save_npz(f'{prefix}round_{t}.npz', **_record_to_arrays(rec))
  return state


def round_test_acc(rec: crfm.RoundRecord, fit_only: bool = False) -> Optional[float]:
  """A round's test accuracy (refit predictor if any, or the fit-only one); None if no test."""
  scores = rec.scores.get('test_fit_only', rec.scores.get('test')) if fit_only else (
      rec.scores.get('test'))
  return None if scores is None else scores['acc']


def run(values) -> Dict[str, Any]:
  """The whole experiment for parsed flag `values`; returns the summary dict."""
  multihost.initialize(values)
  start = time.perf_counter()
  config = crfm.check_config(config_from_flags(values))
  train, test = load_data(values.dataset, values.train_split, values.test_split,
                          values.n_train, values.n_test, values.seed, values.tfds_data_dir,
                          values.manual_dir)
  kw = dict(x_test=test.images, y_test=test.labels) if test is not None else {}
  # Validates everything (labels, shapes, NaNs, splits) before the workdir is touched.
  state = crfm.convrfm_init(train.images, train.labels, config=config,
                            num_classes=train.num_classes, **kw)
  wd = multihost.prepare_workdir(
      values.workdir, dict(data_config(values), convrfm=config._asdict()), prefix='convrfm_')
  logging.info('Writing to %s.', wd)
  load_seconds = time.perf_counter() - start
  state = run_rounds(state, wd, sample_image=np.asarray(state.x_fit[0]))
  best = crfm.best_round(state)
  first = state.history[0]
  summary = dict(
      selection_split=state.selection_split, best_round=best.round, refit=state.refits,
      cntk_test_acc=round_test_acc(first),
      convrfm_test_acc=round_test_acc(best),
      cntk_test_acc_fit_only=round_test_acc(first, fit_only=True),
      convrfm_test_acc_fit_only=round_test_acc(best, fit_only=True),
      test_acc_per_round=[round_test_acc(r) for r in state.history],
      test_acc_fit_only_per_round=[round_test_acc(r, fit_only=True) for r in state.history],
      val_acc_per_round=[r.scores.get(state.selection_split, {}).get('acc')
                         for r in state.history],
      seconds_total_this_process=time.perf_counter() - start,
      seconds_loading=load_seconds,
      seconds_per_round=[r.seconds for r in state.history],
      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  wd.write_json('summary.json', summary)
  msg = (f'CNTK (round 0) test accuracy {summary["cntk_test_acc"]}, ConvRFM (round '
         f'{best.round}, selected on {state.selection_split}) {summary["convrfm_test_acc"]}')
  if state.refits:
    msg += (f' (refit on fit + val; fit-only predictors: {summary["cntk_test_acc_fit_only"]}'
            f' -> {summary["convrfm_test_acc_fit_only"]})')
  logging.info(msg)
  print(msg)
  return summary


def main(argv):
  del argv
  run(FLAGS)


if __name__ == '__main__':
  experiments.use_jax_flags()
  define_flags()
  app.run(main)
