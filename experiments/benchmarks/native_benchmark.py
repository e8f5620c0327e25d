r"""Native CPU kernels vs the XLA fused path, on ConvRFM and Deep ConvRFM workloads, in one run.

Two phases of a ConvRFM round at the README's scale (42x42x1 images, q = 3, depth 3, NTK,
VALID, a random PSD patch metric, float32, uniform pixels):

* `kernel`: the `(n, n)` fused CNTK matrix (`fused.fused_conv_kernel`, as ConvRFM's evaluation
  tiles call it);
* `agop`: the predictor AGOP over `--agop_n` training images as samples (10 classes), as
  ConvRFM's AGOP step calls it: the fused native custom call (every ordered pair) against the
  XLA symmetric path (each unordered pair once, the default aligned blocks);

and one of a Deep ConvRFM final layer (the CIFAR-10 run in the README: 128 ReLU feature maps
of 30x30, q = 3 so d = 1152, depth 2, NTK, VALID, the identity metric, float32):

* `pixels`: the `(n, n)` kernel matrix, which the native path computes from pixels
  (`native.from_pixels`) and the XLA path from per-pixel Grams and window sums.

Each (phase, path) runs in a fresh subprocess with `JCONVRFM_NATIVE=1` (native custom calls) or
`0` (the XLA path), compiles once, then times `--repeats` calls; the table gives the medians,
the XLA / native ratio, the subprocess's peak RSS, and the relative Frobenius difference
between the two paths' results (same inputs, same seed). About 3 minutes on a 2-core CPU:

  python -m experiments.benchmarks.native_benchmark
"""

import json

from absl import app
from absl import flags

from experiments import benchmarks

FLAGS = flags.FLAGS
flags.DEFINE_integer('kernel_n', 1000, 'Images per side of the timed kernel matrix.')
flags.DEFINE_integer('agop_n', 800, 'Training images (= samples) of the timed AGOP.')
flags.DEFINE_integer('pixels_n', 400, 'Images per side of the timed feature-map kernel matrix.')
flags.DEFINE_integer('repeats', 3, 'Timed calls after compilation (median reported).')
flags.DEFINE_list('phases', ['kernel', 'agop', 'pixels'], 'Phases to time.')
flags.DEFINE_string('workdir', None, 'If set, write results.json there (every row).')
flags.DEFINE_string('worker', '', 'Internal: run one (phase, path) and print JSON.')


def _worker(spec):
  """Runs in a subprocess whose JCONVRFM_NATIVE is set: compile, time, save the result."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jconvrfm._src import checks  # pylint: disable=g-import-not-at-top
  from jconvrfm._src import predictor_agop as pa  # pylint: disable=g-import-not-at-top
  from jconvrfm._src.kernels import fused  # pylint: disable=g-import-not-at-top
  from jconvrfm._src.kernels import native  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  n = spec['n']
  x = jnp.asarray(rng.uniform(size=(n, 42, 42, 1)), jnp.float32)
  a = rng.normal(size=(9, 9))
  metric = jnp.asarray(a @ a.T / 9, jnp.float32)
  if spec['phase'] == 'pixels':
    maps = jnp.asarray(np.maximum(rng.normal(size=(n, 30, 30, 128)), 0.0), jnp.float32)
    call = lambda: fused.fused_conv_kernel(maps, maps, None, 2, 3, checks.Padding.VALID,
                                           fused.Kind.NTK)
  elif spec['phase'] == 'kernel':
    y = jnp.asarray(rng.uniform(size=(n, 42, 42, 1)), jnp.float32)
    call = lambda: fused.fused_conv_kernel(x, y, metric, 3, 3, checks.Padding.VALID,
                                           fused.Kind.NTK)
  else:
    alpha = jnp.asarray(rng.normal(size=(n, 10)) / n, jnp.float32)
    kernel = fused.GramConvKernel(3, 3, checks.Padding.VALID, 1, fused.Kind.NTK)
    idx = np.arange(n)
    call = lambda: pa.predictor_agop_from_grams(kernel, x, alpha, z_indices=idx, patch_size=3,
                                                metric=metric)
  benchmarks.time_and_report(call, spec['repeats'], spec['out'],
                             native=bool(native.available()))


def main(argv):
  del argv
  if FLAGS.worker:
    _worker(json.loads(FLAGS.worker))
    return
  import tempfile  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for phase in FLAGS.phases:
      n = {'kernel': FLAGS.kernel_n, 'agop': FLAGS.agop_n, 'pixels': FLAGS.pixels_n}[phase]
      res = benchmarks.run_paths(
          'experiments.benchmarks.native_benchmark',
          dict(phase=phase, n=n, repeats=FLAGS.repeats), ('native', 'xla'), tmp,
          env=lambda path: {'JCONVRFM_NATIVE': '1' if path == 'native' else '0'})
      diff = (np.linalg.norm(res['native']['result'] - res['xla']['result']) /
              np.linalg.norm(res['xla']['result']))
      rows.append((phase, n, res, diff))
  device = rows[0][2]['native']['device']
  print(f'\nNative CPU kernels vs XLA fused path, float32, NTK, VALID, q=3, median of '
        f'{FLAGS.repeats} after compilation; device: {device}\n'
        f'kernel, agop: 42x42x1, depth 3, a metric; pixels: 30x30x128 ReLU maps, depth 2, '
        f'identity metric')
  header = (f'{"phase":<8}{"n":>6}{"native s":>10}{"xla s":>9}{"xla/native":>12}'
            f'{"compile s (nat/xla)":>21}{"max RSS MB (nat/xla)":>22}{"rel. diff":>11}')
  print(header)
  print('-' * len(header))
  for phase, n, res, diff in rows:
    nat, xla = res['native'], res['xla']
    if not nat['native']:
      print('  WARNING: the native kernel was unavailable; both rows are the XLA path')
    print(f'{phase:<8}{n:>6}{nat["median_s"]:>10.2f}{xla["median_s"]:>9.2f}'
          f'{xla["median_s"] / nat["median_s"]:>12.2f}'
          f'{nat["compile_s"]:>11.1f} /{xla["compile_s"]:>6.1f}'
          f'{nat["maxrss_mb"]:>12.0f} /{xla["maxrss_mb"]:>6.0f}{diff:>12.1e}')
    if not (nat['finite'] and xla['finite']):
      print(f'  WARNING: non-finite results in {phase}')
  if FLAGS.workdir:
    benchmarks.write_results(FLAGS.workdir, {'repeats': FLAGS.repeats, 'device': device, 'rows': [
        dict(phase=phase, n=n, rel_diff=float(diff),
             **benchmarks.without_results(res))
        for phase, n, res, diff in rows]})


if __name__ == '__main__':
  app.run(main)
