r"""ConvRFM over many data seeds in one process: the spread of the gain, not one draw.

One ConvRFM run per (seed, protocol), with the flags of `experiments/convrfm.py` (`--seeds` in
place of its `--seed`, `--protocols` in place of `--select_on_test`). The runs share one process,
so every seed after the first reuses the compiled programs: a 4-round noisy-MNIST run then takes
about 1.6 s on an NVIDIA H100 (about 85 s on a 2-core CPU, where compilation is a small part).

Protocols: `default` (ridge and round chosen on a validation split carved from the training
images, then refit on all of them; `experiments/convrfm.py` with no flag) and `reference` (the
authors' protocol: all training images fitted, ridge and round chosen on the test set).

Writes to `--workdir`:
- `config.json`: the data and ConvRFM configuration shared by all runs (no seed);
- `runs.jsonl`: one line per finished (seed, protocol): test accuracy per round (the refit
  predictor's where there is one), the fit-only predictor's, the accuracy on the selection split,
  the chosen ridges, the round selection picks, and seconds per phase;
- `summary.json` and a table on stdout: per protocol, the mean and standard deviation of the
  test accuracy per round, the gain of the last round over round 0 (mean, sd, range) and how
  many seeds gain at least `--min_gain` points; with both protocols, their paired difference.

A run killed part-way keeps every finished (seed, protocol) line; rerunning with the same flags
skips them, and a rerun with more `--seeds` in the same workdir adds only the new seeds.

The noisy-MNIST study of WORKSPACE.md (32 data seeds, both protocols):

  python -m experiments.convrfm_seeds --workdir=/tmp/nmnist_seeds --dataset=noisy_mnist \
    --train_split='train[:1000]' --test_split='test[:1000]' --n_train=1000 --n_test=1000 \
    --manual_dir=../shared/data/mnist --tfds_data_dir=/tmp/tfds --q=3 --depth=3 --rounds=4 \
    --seeds=0-31 --protocols=default,reference

References:
  D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
  convolutional neural networks. arXiv:2309.00570, 2023 (the reference protocol and numbers).
"""

import json
import math
import time
from typing import Any, Dict, List, Sequence

from absl import app
from absl import flags
from absl import logging

import experiments
from experiments import convrfm as exp
from experiments import multihost
from jconvrfm._src import convrfm as crfm

FLAGS = flags.FLAGS

PROTOCOLS = ('default', 'reference')


def define_flags(flag_values=FLAGS):
  """`experiments/convrfm.py`'s flags plus `--seeds`, `--protocols` and `--min_gain`."""
  exp.define_flags(flag_values)
  define = exp._Definer(flag_values)  # pylint: disable=protected-access
  define.string('seeds', '0-3', 'Data seeds: comma-separated integers and ranges, e.g. '
                '"0-31" or "0,2,5-7" (each sets what --seed sets in experiments/convrfm.py).')
  define.list('protocols', ['default'], f'Protocols to run for every seed, from {PROTOCOLS}.')
  define.float('min_gain', 5.0, 'Gain (test accuracy points, last round over round 0) that the '
               'summary counts seeds against.')


def parse_seeds(spec: str) -> List[int]:
  """`'0-3,7'` -> `[0, 1, 2, 3, 7]`; a ValueError naming --seeds for anything else."""
  seeds = []
  for part in (p.strip() for p in str(spec).split(',')):
    lo, dash, hi = part.partition('-')
    try:
      first = int(lo)
      last = int(hi) if dash else first
    except ValueError:
      raise ValueError(f'--seeds must be comma-separated non-negative integers or ranges such '
                       f'as "0-31,40", got {spec!r}.') from None
    if first < 0 or last < first:
      raise ValueError(f'--seeds: the range {part!r} in {spec!r} is empty or negative.')
    seeds.extend(range(first, last + 1))
  if len(set(seeds)) != len(seeds):
    raise ValueError(f'--seeds lists a seed twice: {spec!r}.')
  return seeds


def _check_flags(values):
  for name, instead in (('seed', '--seeds'), ('select_on_test', '--protocols=reference')):
    if values[name].present:
      raise ValueError(f'--{name} is not used by convrfm_seeds; use {instead}.')
  unknown = [p for p in values.protocols if p not in PROTOCOLS]
  if unknown or not values.protocols:
    raise ValueError(f'--protocols must be a non-empty list from {PROTOCOLS}, got '
                     f'{values.protocols!r}.')
  if len(set(values.protocols)) != len(values.protocols):
    raise ValueError(f'--protocols lists a protocol twice: {values.protocols!r}.')
  if values.n_test < 1:
    raise ValueError(f'--n_test must be >= 1 (the study compares test accuracies), got '
                     f'{values.n_test}.')


def run_line(state: crfm.ConvRFMState, seed: int, protocol: str,
             seconds: float) -> Dict[str, Any]:
  """The runs.jsonl entry of one finished run."""
  best = crfm.best_round(state)
  return dict(
      seed=seed, protocol=protocol, best_round=best.round, selection_split=state.selection_split,
      test_acc=[exp.round_test_acc(r) for r in state.history],
      test_fit_only_acc=[exp.round_test_acc(r, fit_only=True) for r in state.history],
      selection_acc=[r.scores[state.selection_split]['acc'] for r in state.history],
      ridge=[r.ridge for r in state.history],
      seconds=[r.seconds for r in state.history], seconds_total=seconds)


def _mean_sd(xs: Sequence[float]):
  mean = sum(xs) / len(xs)
  sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
  return mean, sd


def summarize(lines: Sequence[Dict[str, Any]], seeds: Sequence[int],
              protocols: Sequence[str], min_gain: float) -> Dict[str, Any]:
  """Per-protocol statistics over `seeds` (accuracies in percent points)."""
  by = {(l['seed'], l['protocol']): l for l in lines}
  out = dict(seeds=list(seeds), protocols=list(protocols), min_gain_points=min_gain)
  finals = {}
  for protocol in protocols:
    runs = [by[(s, protocol)] for s in seeds]
    acc = [[100 * a for a in r['test_acc']] for r in runs]
    rounds = len(acc[0])
    gains = [a[-1] - a[0] for a in acc]
    finals[protocol] = [a[-1] for a in acc]
    per_round = [_mean_sd([a[t] for a in acc]) for t in range(rounds)]
    gain_mean, gain_sd = _mean_sd(gains)
    out[protocol] = dict(
        runs=len(runs), test_acc_mean=[m for m, _ in per_round],
        test_acc_sd=[s for _, s in per_round], gain_mean=gain_mean, gain_sd=gain_sd,
        gain_min=min(gains), gain_max=max(gains),
        seeds_with_min_gain=sum(g >= min_gain - 1e-9 for g in gains),
        selected_test_acc_mean=_mean_sd([100 * r['test_acc'][r['best_round']]
                                         for r in runs])[0])
  if len(protocols) == 2:
    diff = [a - b for a, b in zip(finals[protocols[0]], finals[protocols[1]])]
    mean, sd = _mean_sd(diff)
    out['paired_last_round'] = dict(minus=f'{protocols[0]} - {protocols[1]}', mean=mean, sd=sd)
  return out


def format_table(summary: Dict[str, Any]) -> str:
  seeds = summary['seeds']
  rows = []
  for protocol in summary['protocols']:
    s = summary[protocol]
    cells = [f'{m:5.2f} +- {sd:4.2f}' for m, sd in zip(s['test_acc_mean'], s['test_acc_sd'])]
    rows.append(
        f'{protocol:9s} {s["runs"]:5d}  ' + '  '.join(cells) +
        f'  {s["gain_mean"]:+5.2f} +- {s["gain_sd"]:4.2f} ({s["gain_min"]:+.1f} .. '
        f'{s["gain_max"]:+.1f})  {s["seeds_with_min_gain"]}/{s["runs"]}')
  rounds = len(summary[summary['protocols'][0]]['test_acc_mean'])
  head = (f'{"protocol":9s} {"seeds":>5s}  ' +
          '  '.join(f'{"round " + str(t):>13s}' for t in range(rounds)) +
          f'  {"gain, last round over round 0":>30s}  gain >= {summary["min_gain_points"]:g}')
  text = [f'ConvRFM test accuracy (%) over data seeds {seeds[0]}..{seeds[-1]} '
          f'({len(seeds)} seeds), mean +- sd:', head] + rows
  if 'paired_last_round' in summary:
    p = summary['paired_last_round']
    text.append(f'last round, {p["minus"]} per seed: {p["mean"]:+.2f} +- {p["sd"]:.2f} points')
  return '\n'.join(text)


def _init(data, base: crfm.ConvRFMConfig, seed: int, protocol: str) -> crfm.ConvRFMState:
  train, test = data
  config = base._replace(seed=seed, select_on_test=protocol == 'reference')
  return crfm.convrfm_init(train.images, train.labels, config=config,
                           num_classes=train.num_classes, x_test=test.images, y_test=test.labels)


def run(values) -> Dict[str, Any]:
  """The whole study for parsed flag `values`; returns the summary dict."""
  _check_flags(values)
  multihost.initialize(values)
  seeds = parse_seeds(values.seeds)
  protocols = list(values.protocols)
  base = crfm.check_config(exp.config_from_flags(values)._replace(seed=0, select_on_test=False))
  shared = {k: v for k, v in base._asdict().items() if k not in ('seed', 'select_on_test')}
  data_cfg = {k: v for k, v in exp.data_config(values).items() if k != 'seed'}
  # The first seed's data and splits are loaded and checked before the workdir is touched.
  first = exp.load_data(values.dataset, values.train_split, values.test_split, values.n_train,
                        values.n_test, seeds[0], values.tfds_data_dir, values.manual_dir)
  for protocol in protocols:
    _init(first, base, seeds[0], protocol)
  wd = multihost.prepare_workdir(values.workdir, dict(data_cfg, convrfm=shared),
                                prefix='convrfm_seeds_')
  lines = [json.loads(l) for l in (wd.read_text('runs.jsonl') or '').splitlines() if l.strip()]
  done = {(l['seed'], l['protocol']) for l in lines}
  for seed in seeds:
    todo = [p for p in protocols if (seed, p) not in done]
    if not todo:
      continue
    train, test = first if seed == seeds[0] else exp.load_data(
        values.dataset, values.train_split, values.test_split, values.n_train, values.n_test,
        seed, values.tfds_data_dir, values.manual_dir)
    for protocol in todo:
      start = time.perf_counter()
      state = _init((train, test), base, seed, protocol)
      while not state.done:
        state = crfm.convrfm_step(state)
      line = run_line(state, seed, protocol, time.perf_counter() - start)
      lines.append(line)
      wd.write_text('runs.jsonl', ''.join(json.dumps(l, sort_keys=True) + '\n' for l in lines))
      logging.info('seed %d, %s: test accuracy per round %s (%.1f s)', seed, protocol,
                   line['test_acc'], line['seconds_total'])
  summary = summarize(lines, seeds, protocols, values.min_gain)
  wd.write_json('summary.json', summary)
  print(format_table(summary))
  return summary


def main(argv):
  del argv
  run(FLAGS)


if __name__ == '__main__':
  experiments.use_jax_flags()
  define_flags()
  app.run(main)
