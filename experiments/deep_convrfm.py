r"""Deep ConvRFM: layer-wise ConvRFM with random filters drawn from each learned metric.

Layer l runs ConvRFM (rounds as in `experiments.convrfm`) with a CNTK of `depth - l` layers
on the current feature maps, keeps the best round's metric M, draws `--width` filters from
N(0, M) and featurises all images with them; a final ConvRFM of depth `depth - layers` runs on
the learned features. With `--refit` (default) every ConvRFM refits its chosen ridge on fit +
validation images for its test scores (the metric, hence the filters, comes from the fit-only
predictor, so refit changes only reported test scores of the learned layers, and the final
predictor). Writes to `--workdir`:

* `config.json` (a rerun must match it), `metrics.jsonl` (one line per round and layer, with a
  `layer` field; `layer == layers` is the final ConvRFM);
* `layer<l>_round_<t>.npz` per finished round (atomic; a killed run resumes after the last
  finished round of the last unfinished layer), `layer<l>_filters.npy` `(q, q, c, width)` and
  `layer<l>_metric.npy` (the learned M the filters were drawn from, unless
  `--filter_metric=identity`, the ablation that draws them from N(0, I));
* `layer<l>_eigenfilters.png` (top-8 eigenvectors of that M; layer 0 on RGB images gives the
  colour edge filters), per-round figures for layer 0, `summary.json`.

CIFAR-10 JPEG test images split into 2000 train / 1000 test with a fixed seed:

  python -m experiments.deep_convrfm --workdir=/tmp/deep_cifar \
    --dataset=folder:../shared/data/cifar10_jpeg --train_split=test --test_split=test \
    --n_train=2000 --n_test=1000 --q=3 --depth=3 --rounds=3 --width=64

The filter-seed study of WORKSPACE.md is that run (with its flags there) for `--filter_seed=0`
to `7`, the images fixed by `--seed=0`. Layer 0 does not depend on the filters, so such sweeps
(and sweeps over `--width`, `--sampler`, `--nonlinearity`, `--filter_metric`, `--final_rounds`)
can copy its finished rounds from an earlier run instead of recomputing them:

  python -m experiments.deep_convrfm --workdir=/tmp/deep_cifar_fs1 <the same flags> \
    --filter_seed=1 --layer0_from=/tmp/deep_cifar

Multi-host: `--distributed` on every host, as for `experiments.convrfm`.

References:
  D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
  convolutional neural networks. arXiv:2309.00570, 2023.
"""

import itertools
import resource
import time
from typing import Any, Dict

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

import experiments
from experiments import convrfm as exp
from experiments import multihost
from jconvrfm._src import convrfm as crfm
from jconvrfm._src import deep_convrfm as deep

FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
  exp.define_flags(flag_values)
  define = exp._Definer(flag_values)  # pylint: disable=protected-access
  define.integer('layers', -1, 'Learned layers (-1: depth - 1).')
  define.integer('width', 64, 'Random filters per learned layer.')
  define.enum('sampler', 'sqrt', list(deep.SAMPLERS), 'Filter sampler.')
  define.enum('nonlinearity', 'none', sorted(deep.NONLINEARITIES),
              'Nonlinearity after each featurisation.')
  define.enum('filter_metric', 'learned', list(deep.FILTER_METRICS),
              'Covariance of the random filters: the learned M, or (ablation) the identity.')
  define.integer('filter_seed', -1,
                 'Seed of the random filters (-1: --seed, which also draws the data, splits and '
                 'AGOP samples). With --seed fixed, runs that differ only in --filter_seed share '
                 'the images and layer 0 and show how much the result depends on the filter draw.')
  define.integer('final_rounds', -1,
                 'ConvRFM rounds of the final kernel on the learned features (-1: --rounds; '
                 '1: plain CNTK ridge regression on them).')
  define.string('layer0_from', None,
                'Workdir of an earlier run with the same data and layer-0 settings (it may '
                'differ in ' + ', '.join(f'--{k}' for k in _FILTER_ONLY_KEYS) + '): its '
                'finished layer-0 rounds are copied into --workdir instead of recomputed.')


# Settings that act only after layer 0's ConvRFM (on the filters drawn from its metric and
# what follows), so runs that differ only in them share layer 0 exactly.
_FILTER_ONLY_KEYS = ('filter_seed', 'width', 'sampler', 'nonlinearity', 'filter_metric',
                     'final_rounds')


def _layer0_source(source: str, cfg_dict: Dict[str, Any], n_layers: int) -> multihost.Workdir:
  """Checks that `source` holds finished layer-0 rounds of a run compatible with `cfg_dict`."""
  src = multihost.Workdir(source)
  if n_layers < 1:
    raise ValueError('--layer0_from needs at least one learned layer (--layers >= 1): with '
                     '--layers=0 layer 0 is the final ConvRFM.')
  saved = src.read_json('config.json')
  if saved is None:
    raise ValueError(f'--layer0_from: {src} is not a deep_convrfm workdir (no config.json).')
  if not src.exists('layer0_round_0.npz') or not src.exists('layer0_metrics.jsonl'):
    raise ValueError(f'--layer0_from: {src} has no finished layer-0 round.')
  diff = multihost.config_diff(saved, cfg_dict, ignore=_FILTER_ONLY_KEYS)
  if diff:
    raise ValueError(f'--layer0_from: {src} ran layer 0 with different settings (differs in '
                     f'{diff}); only {list(_FILTER_ONLY_KEYS)} may differ.')
  return src


def _copy_layer0(src: multihost.Workdir, dst: multihost.Workdir) -> int:
  """Copies layer 0's finished rounds (and figures) from `src` unless `dst` has as many.

  Returns the number of layer-0 rounds copied. The metrics file goes first and each round file
  (the commit point of a round, as in `run_rounds`) after it. In a multi-process run process 0
  copies; the others read the copies through it when the rounds are restored.
  """
  count = lambda d: next(t for t in itertools.count()
                         if not d.exists(f'layer0_round_{t}.npz'))
  n_src = count(src)
  if count(dst) >= n_src:
    return 0
  if multihost.is_writer():
    for name in sorted(p.name for p in src.root.glob('layer0_*round*.png')):
      dst.write_bytes(name, (src / name).read_bytes())
    dst.write_bytes('layer0_metrics.jsonl', (src / 'layer0_metrics.jsonl').read_bytes())
    for t in range(n_src):
      name = f'layer0_round_{t}.npz'
      dst.write_bytes(name, (src / name).read_bytes())
  return n_src


def config_from_flags(values) -> deep.DeepConvRFMConfig:
  return deep.DeepConvRFMConfig(
      convrfm=exp.config_from_flags(values), layers=None if values.layers < 0 else values.layers,
      width=values.width, sampler=values.sampler, nonlinearity=values.nonlinearity,
      filter_metric=values.filter_metric,
      seed=values.seed if values.filter_seed < 0 else values.filter_seed)


def run(values) -> Dict[str, Any]:
  """The whole experiment for parsed flag `values`; returns the summary dict."""
  multihost.initialize(values)
  start = time.perf_counter()
  config, n_layers = deep._check_deep_config(  # pylint: disable=protected-access
      config_from_flags(values))
  base = config.convrfm
  train, test = exp.load_data(values.dataset, values.train_split, values.test_split,
                              values.n_train, values.n_test, values.seed,
                              values.tfds_data_dir, values.manual_dir)
  kw = dict(x_test=test.images, y_test=test.labels) if test is not None else {}
  # Validates the data and carves the selection split once (before the workdir is touched).
  init = crfm.convrfm_init(train.images, train.labels, config=base._replace(depth=1),
                           num_classes=train.num_classes, **kw)
  if values.filter_seed < -1:
    raise ValueError(f'--filter_seed must be -1 (use --seed) or a seed >= 0, got '
                     f'{values.filter_seed}.')
  if values.final_rounds == 0 or values.final_rounds < -1:
    raise ValueError(f'--final_rounds must be -1 or a positive integer, got '
                     f'{values.final_rounds}.')
  cfg_dict = dict(exp.data_config(values), convrfm=base._asdict(), layers=n_layers,
                  final_rounds=values.final_rounds,
                  width=config.width, sampler=config.sampler,
                  nonlinearity=config.nonlinearity, filter_metric=config.filter_metric)
  if values.filter_seed >= 0:
    # Only when given, so that workdirs written before this flag existed still resume.
    cfg_dict['filter_seed'] = values.filter_seed
  layer0_src = (None if values.layer0_from is None else
                _layer0_source(values.layer0_from, cfg_dict, n_layers))
  wd = multihost.prepare_workdir(values.workdir, cfg_dict, prefix='deep_convrfm_')
  logging.info('Writing to %s.', wd)
  if layer0_src is not None and layer0_src.root.resolve() != wd.root.resolve():
    copied = _copy_layer0(layer0_src, wd)
    logging.info('Copied %d finished layer-0 round(s) from %s.', copied, layer0_src)
  feats = {'fit': init.x_fit, 'val': init.x_val, 'test': init.x_test}
  key = jax.random.PRNGKey(config.seed)
  per_layer = []
  cntk_round = None   # round 0 of layer 0: the plain CNTK of the full depth

  final_rounds = base.rounds if values.final_rounds < 0 else values.final_rounds

  def convrfm_layer(l, depth):
    cfg = base._replace(depth=depth)
    if l == n_layers:
      cfg = cfg._replace(rounds=final_rounds)
    state = crfm.convrfm_init(feats['fit'], init.y_fit, config=cfg,
                              x_val=feats['val'], y_val=init.y_val, x_test=feats['test'],
                              y_test=init.y_test, num_classes=init.num_classes)
    channels = feats['fit'].shape[-1]
    state = exp.run_rounds(state, wd, prefix=f'layer{l}_',
                           sample_image=np.asarray(feats['fit'][0]) if channels <= 3 else None,
                           line_extra={'layer': l, 'kernel_depth': depth}, figures=(l == 0))
    lines = []
    for k in range(l + 1):
      lines += (wd.read_text(f'layer{k}_metrics.jsonl') or '').splitlines()
    wd.write_text('metrics.jsonl', '\n'.join(lines) + '\n')
    return state

  for l in range(n_layers):
    state = convrfm_layer(l, base.depth - l)
    cntk_round = cntk_round or state.history[0]
    best = crfm.best_round(state)
    key, sub = jax.random.split(key)
    c = feats['fit'].shape[-1]
    saved = wd.load_npy(f'layer{l}_filters.npy')
    if saved is not None:
      filters = jnp.asarray(saved, base.dtype)
    else:
      filters = deep.sample_filters(deep.filter_metric(config, best.metric), config.width, sub,
                                    patch_size=base.patch_size, channels=c,
                                    sampler=config.sampler)
      wd.save_npy(f'layer{l}_metric.npy', best.metric)
      wd.save_npy(f'layer{l}_filters.npy', filters)
    exp.plot_eigenfilters(best.metric, base.patch_size, c, wd, f'layer{l}_eigenfilters.png',
                          f'layer {l} (best round {best.round}): top eigenvectors of M')
    feats = {k: None if v is None else deep.featurize_layer(
        v, filters, padding=base.padding, nonlinearity=config.nonlinearity)
             for k, v in feats.items()}
    per_layer.append(dict(layer=l, kernel_depth=base.depth - l, best_round=best.round,
                          test_acc_per_round=[exp.round_test_acc(r) for r in state.history],
                          best_test_acc=exp.round_test_acc(best),
                          features=list(feats['fit'].shape[1:])))
  final = convrfm_layer(n_layers, base.depth - n_layers)
  best = crfm.best_round(final)
  cntk_round = cntk_round or final.history[0]
  summary = dict(
      refit=final.refits,
      cntk_test_acc=exp.round_test_acc(cntk_round),
      deep_convrfm_test_acc=exp.round_test_acc(best),
      cntk_test_acc_fit_only=exp.round_test_acc(cntk_round, fit_only=True),
      deep_convrfm_test_acc_fit_only=exp.round_test_acc(best, fit_only=True),
      final_best_round=best.round, layers=per_layer,
      final_test_acc_per_round=[exp.round_test_acc(r) for r in final.history],
      seconds_total_this_process=time.perf_counter() - start,
      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  if layer0_src is not None:
    summary['layer0_from'] = str(layer0_src)
  wd.write_json('summary.json', summary)
  msg = (f'CNTK (depth {base.depth}, round 0) test accuracy {summary["cntk_test_acc"]}, Deep '
         f'ConvRFM ({n_layers} learned layer(s)) {summary["deep_convrfm_test_acc"]}')
  if final.refits:
    msg += (f' (refit on fit + val; fit-only predictors: {summary["cntk_test_acc_fit_only"]} '
            f'-> {summary["deep_convrfm_test_acc_fit_only"]})')
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
