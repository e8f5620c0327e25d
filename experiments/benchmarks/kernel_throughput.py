r"""Throughput of the ConvRFM kernel: fused closed form vs neural-tangents, in one run.

For each configuration (42x42x1 with q=3, depth 3; 32x32x3 with q=3, depth 5; each with and
without a random PSD patch metric) and each implementation, a fresh subprocess compiles the
kernel, then times `--repeats` calls on an `(n, n)` block; the table shows the median kernel
entries per second, the fused/NT ratio, the subprocess's peak memory (host max RSS, and on
an accelerator `peak_bytes_in_use`), and an estimate of the fused path's memory traffic
(see `_fused_bytes`) divided by time, as a fraction of `--peak_bandwidth_gbs` when given.

Run (about 2-4 minutes on a 2-core CPU):

  python -m experiments.benchmarks.kernel_throughput --n=64 --repeats=5

Measured 2026-11-29, 2-core Sapphire Rapids Xeon, jax 0.10.2, n=128 (native CPU kernel):
  42x42x1 q3 d3: 288,183 / 13,486 (21.4x), with a metric 247,645 / 13,001 (19.0x);
  32x32x3 q3 d5: 243,563 / 9,016 (27.0x), with a metric 206,107 / 8,819 (23.4x);
  fused vs NT kernels within 3e-7 to 9e-7 (relative Frobenius).

Measured 2026-11-27 (XLA fused path), float32, entries/s (fused / NT, ratio; peak memory fused vs NT):

  2-core CPU container (idle, n=128, 14:47 UTC), jax 0.10.2:
    42x42x1 q3 d3:           194,137 / 12,345 (15.7x); max RSS 342 vs 1348 MB
    42x42x1 q3 d3 + metric:  110,924 / 12,650  (8.8x)
    32x32x3 q3 d5:           152,384 /  7,772 (19.6x)
    32x32x3 q3 d5 + metric:  109,550 /  8,237 (13.3x)
  NVIDIA H100 80GB (n=256), jax 0.11.2 (before the CPU tuning of the afternoon):
    42x42x1 q3 d3:        17.3 M / 16.4 M (1.06x); device peak 198 vs 1557 MB
    42x42x1 q3 d3 + M:     7.9 M /  8.5 M (0.93x); 215 vs 1557 MB
    32x32x3 q3 d5:        18.0 M / 13.1 M (1.37x); 169 vs 4247 MB
    32x32x3 q3 d5 + M:     8.6 M /  6.1 M (1.41x); 225 vs 4247 MB
"""

import json
import os
import resource
import time

from absl import app
from absl import flags
from absl import logging

from experiments import benchmarks

FLAGS = flags.FLAGS
flags.DEFINE_integer('n', 64, 'Images per side of the timed (n, n) kernel block.')
flags.DEFINE_integer('repeats', 5, 'Timed calls after compilation (median reported).')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'float64'], 'Image and kernel dtype.')
flags.DEFINE_list('impls', ['fused', 'nt'], 'Implementations to time.')
flags.DEFINE_float('peak_bandwidth_gbs', 0.0,
                   'Peak memory bandwidth of the device in GB/s (0: do not report a fraction).')
flags.DEFINE_list('configs', [], 'Configurations to run, by name (see CONFIGS); empty: all.')
flags.DEFINE_string('workdir', None, 'If set, write results.json there (every row).')
flags.DEFINE_string('worker', '', 'Internal: run one configuration (JSON) and print JSON.')

# (name, height, width, channels, patch_size, depth)
CONFIGS = (
    ('42x42x1 q3 d3', 42, 42, 1, 3, 3),
    ('32x32x3 q3 d5', 32, 32, 3, 3, 5),
)


def _fused_bytes(n1, n2, height, width, q, depth, itemsize):
  """Bytes a layer-by-layer NTK evaluation would stream through memory.

  Per layer l with an (H_l, W_l) map it reads and writes the (n1, n2, H_l, W_l) covariance
  and NTK arrays (4 passes); the fused, tiled path keeps these in cache, so the achieved
  "bandwidth" below is an effective figure: how fast the same work would have to stream.
  """
  total = 0
  h, w = height - q + 1, width - q + 1  # VALID
  for _ in range(depth):
    total += 4 * n1 * n2 * h * w * itemsize
    h, w = h - q + 1, w - q + 1
  return total


def _worker(spec):
  """Runs in a subprocess: compile, time, report peak memory."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if spec['dtype'] == 'float64':
    jax.config.update('jax_enable_x64', True)
  import jconvrfm  # pylint: disable=g-import-not-at-top

  dtype = jnp.dtype(spec['dtype'])
  rng = np.random.default_rng(0)
  n, h, w, c, q = spec['n'], spec['h'], spec['w'], spec['c'], spec['q']
  x1 = jnp.asarray(rng.uniform(size=(n, h, w, c)), dtype)
  x2 = jnp.asarray(rng.uniform(size=(n, h, w, c)), dtype)
  metric = None
  if spec['metric']:
    d = q * q * c
    a = rng.normal(size=(d, d))
    metric = jnp.asarray(a @ a.T / d, dtype)

  def call():
    return jconvrfm.conv_ntk(x1, x2, depth=spec['depth'], patch_size=q, metric=metric,
                             impl=spec['impl']).block_until_ready()

  start = time.perf_counter()
  k = call()
  compile_s = time.perf_counter() - start
  np.save(spec['out'], np.asarray(k))
  times = []
  for _ in range(spec['repeats']):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  out = {
      'median_s': float(np.median(times)),
      'compile_s': compile_s,
      'finite': bool(jnp.all(jnp.isfinite(k))),
      'maxrss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      'device': str(jax.devices()[0].device_kind),
      'backend': jax.default_backend(),
  }
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != 'cpu' else None
  if stats and 'peak_bytes_in_use' in stats:
    out['peak_device_mb'] = stats['peak_bytes_in_use'] / 2**20
  print(json.dumps(out))


def _run_config(spec):
  return benchmarks.run_worker('experiments.benchmarks.kernel_throughput', spec)


def main(argv):
  del argv
  if FLAGS.worker:
    _worker(json.loads(FLAGS.worker))
    return
  import tempfile  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  names = [c[0] for c in CONFIGS]
  unknown = sorted(set(FLAGS.configs) - set(names))
  if unknown:
    raise app.UsageError(f'--configs: unknown {unknown}; expected some of {names}.')
  itemsize = 4 if FLAGS.dtype == 'float32' else 8
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name, h, w, c, q, depth in CONFIGS:
      if FLAGS.configs and name not in FLAGS.configs:
        continue
      for use_metric in (False, True):
        result, values = {}, {}
        for impl in FLAGS.impls:
          spec = dict(n=FLAGS.n, h=h, w=w, c=c, q=q, depth=depth, metric=use_metric, impl=impl,
                      repeats=FLAGS.repeats, dtype=FLAGS.dtype,
                      out=os.path.join(tmp, f'{impl}.npy'))
          logging.info('running %s metric=%s impl=%s', name, use_metric, impl)
          result[impl] = _run_config(spec)
          values[impl] = np.load(spec['out']).astype(np.float64)
        if 'fused' in values and 'nt' in values:
          # The same inputs (seeded) in both workers: the fused path against neural-tangents.
          diff = float(np.linalg.norm(values['fused'] - values['nt']) /
                       np.linalg.norm(values['nt']))
          for res in result.values():
            res['rel_diff_fused_vs_nt'] = diff
        rows.append((name, use_metric, depth, h, w, q, result))

  entries = FLAGS.n * FLAGS.n
  device = next(iter(rows[0][-1].values()))['device']
  print(f'\nKernel throughput, n = {FLAGS.n} (entries per call {entries}), {FLAGS.dtype}, '
        f'median of {FLAGS.repeats} after compilation; device: {device}')
  header = (f'{"config":<16}{"metric":<8}{"impl":<7}{"entries/s":>12}{"ratio":>8}'
            f'{"compile s":>11}{"max RSS MB":>12}{"dev peak MB":>13}{"eff. GB/s":>11}'
            f'{"of peak":>9}{"rel. diff":>11}')
  print(header)
  print('-' * len(header))
  for name, use_metric, depth, h, w, q, result in rows:
    nt_rate = entries / result['nt']['median_s'] if 'nt' in result else None
    for impl, res in result.items():
      rate = entries / res['median_s']
      ratio = f'{rate / nt_rate:.2f}' if nt_rate else '-'
      dev = f'{res["peak_device_mb"]:.0f}' if 'peak_device_mb' in res else '-'
      gbs, frac = '-', '-'
      if impl == 'fused':
        bw = _fused_bytes(FLAGS.n, FLAGS.n, h, w, q, depth, itemsize) / res['median_s'] / 1e9
        gbs = f'{bw:.1f}'
        if FLAGS.peak_bandwidth_gbs > 0:
          frac = f'{bw / FLAGS.peak_bandwidth_gbs:.1%}'
      diff = res.get('rel_diff_fused_vs_nt')
      diff = '-' if diff is None else f'{diff:.1e}'
      print(f'{name:<16}{str(use_metric):<8}{impl:<7}{rate:>12,.0f}{ratio:>8}'
            f'{res["compile_s"]:>11.1f}{res["maxrss_mb"]:>12.0f}{dev:>13}{gbs:>11}{frac:>9}'
            f'{diff:>11}')
      if not res['finite']:
        print(f'  WARNING: non-finite kernel entries for {name} {impl}')
  print('rel. diff: relative Frobenius difference of the fused and neural-tangents kernels.')
  if FLAGS.workdir:
    benchmarks.write_results(FLAGS.workdir, {
        'n': FLAGS.n, 'repeats': FLAGS.repeats, 'dtype': FLAGS.dtype, 'device': device,
        'rows': [dict(config=name, metric=use_metric, impl=impl, **res)
                 for name, use_metric, _, _, _, _, result in rows
                 for impl, res in result.items()]})


if __name__ == '__main__':
  app.run(main)
