r"""A Deep ConvRFM layer with a learned metric on many feature maps: features vs patches, in one run.

Deep ConvRFM runs ConvRFM on the featurised maps of the previous layer: 3 x 3 patches of 64
ReLU feature maps have d = 576, and every round after the first has a learned metric `M`.
Two phases of such a round (30x30x64 maps, q = 3, depth 2, NTK, VALID, float32, a random PSD
metric, 10 classes):

* `kernel`: the symmetric `(n, n)` kernel matrix as ConvRFM builds it. `patches`: the tiled
  path (`tiling.kernel_matrix` over the fused kernel, each tile forming its images' patches and
  `M p`), ConvRFM's route before the features path; `features`: `fused.metric_kernel_matrix`
  (each image's features `F^T p`, `F F^T = M`, formed once per column chunk; the native pixel
  call on them on a CPU);
* `agop`: the predictor AGOP over all `n` images as samples. `patches`: the hand-written XLA
  path on patches (`predictor_agop.FEATURE_MIN_DIM` raised past d), which holds
  `classes`-weighted copies of the training patches; `features`: the features path.

Each (phase, path) runs in a fresh subprocess, compiles once, then times `--repeats` calls; the
table gives medians, the patches / features ratio, each subprocess's peak RSS, and the relative
Frobenius difference between the two results (off the diagonal for the kernel, whose tiled
diagonal goes through the arccos kink at angle 0). About 4 minutes on a 2-core CPU:

  python -m experiments.benchmarks.deep_layer_benchmark

`--metric_rank=88` gives the metric the rank of a third-round learned metric: the features
path then keeps 96 columns of `F` (`fused.metric_factor_reduced`), the patches path all 576.
"""

import json

from absl import app
from absl import flags

from experiments import benchmarks

FLAGS = flags.FLAGS
flags.DEFINE_integer('kernel_n', 200, 'Images per side of the timed kernel matrix.')
flags.DEFINE_integer('agop_n', 160, 'Training images (= samples) of the timed AGOP.')
flags.DEFINE_integer('channels', 64, 'Feature maps (d = 9 * channels).')
flags.DEFINE_integer('size', 30, 'Height and width of the feature maps.')
flags.DEFINE_integer('metric_rank', 0,
                     'Rank of the random PSD metric (0: full, d). Learned metrics are far from '
                     'full rank (the third round of the Deep ConvRFM protocol: 88 and 252 of '
                     '576); the features path then works in that many columns.')
flags.DEFINE_integer('repeats', 2, 'Timed calls after compilation (median reported).')
flags.DEFINE_list('phases', ['kernel', 'agop'], 'Phases to time.')
flags.DEFINE_string('workdir', None, 'If set, write results.json there (every row).')
flags.DEFINE_string('worker', '', 'Internal: run one (phase, path) and print JSON.')


def _worker(spec):
  """Runs in a subprocess: compile, time, save the result."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jconvrfm._src import checks  # pylint: disable=g-import-not-at-top
  from jconvrfm._src import convrfm as crfm  # pylint: disable=g-import-not-at-top
  from jconvrfm._src import predictor_agop as pa  # pylint: disable=g-import-not-at-top
  from jconvrfm._src import tiling  # pylint: disable=g-import-not-at-top
  from jconvrfm._src.kernels import fused  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  n, c, size = spec['n'], spec['channels'], spec['size']
  maps = jnp.asarray(np.maximum(rng.normal(size=(n, size, size, c)), 0.0), jnp.float32)
  d = 9 * c
  a = rng.normal(size=(d, spec['metric_rank'] or d)) / np.sqrt(d)
  metric = a @ a.T
  metric = jnp.asarray(metric / np.linalg.norm(metric), jnp.float32)
  pad, kind = checks.Padding.VALID, fused.Kind.NTK
  if spec['phase'] == 'kernel':
    if spec['path'] == 'features':
      call = lambda: fused.metric_kernel_matrix(maps, None, metric, 2, 3, pad, kind)
    else:
      tile = crfm._FusedTile(2, 3, pad, kind)  # pylint: disable=protected-access
      call = lambda: tiling.kernel_matrix(tile, maps, None, kernel_args=(metric,))
  else:
    alpha = jnp.asarray(rng.normal(size=(n, 10)) / n, jnp.float32)
    kernel = fused.GramConvKernel(2, 3, pad, c, kind)
    if spec['path'] == 'patches':
      pa.FEATURE_MIN_DIM = d
    idx = np.arange(n)
    call = lambda: pa.predictor_agop_from_grams(kernel, maps, alpha, z_indices=idx,
                                                patch_size=3, padding=pad, metric=metric)
  benchmarks.time_and_report(call, spec['repeats'], spec['out'])


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
      n = {'kernel': FLAGS.kernel_n, 'agop': FLAGS.agop_n}[phase]
      res = benchmarks.run_paths(
          'experiments.benchmarks.deep_layer_benchmark',
          dict(phase=phase, n=n, channels=FLAGS.channels, size=FLAGS.size,
               metric_rank=FLAGS.metric_rank, repeats=FLAGS.repeats),
          ('features', 'patches'), tmp)
      got, want = res['features']['result'], res['patches']['result']
      if phase == 'kernel':
        off = ~np.eye(n, dtype=bool)
        got, want = got[off], want[off]
      diff = float(np.linalg.norm(got - want) / np.linalg.norm(want))
      rows.append((phase, n, res, diff))
  device = rows[0][2]['features']['device']
  print(f'\nDeep ConvRFM layer with a learned metric: {FLAGS.size}x{FLAGS.size}x{FLAGS.channels} '
        f'ReLU maps, q = 3 (d = {9 * FLAGS.channels}), metric of rank '
        f'{FLAGS.metric_rank or 9 * FLAGS.channels}, depth 2, NTK, VALID, float32, median of '
        f'{FLAGS.repeats} after compilation; device: {device}')
  header = (f'{"phase":<8}{"n":>6}{"features s":>12}{"patches s":>11}{"patches/features":>18}'
            f'{"max RSS MB (feat/patch)":>25}{"rel. diff":>11}')
  print(header)
  print('-' * len(header))
  for phase, n, res, diff in rows:
    feat, pat = res['features'], res['patches']
    print(f'{phase:<8}{n:>6}{feat["median_s"]:>12.2f}{pat["median_s"]:>11.2f}'
          f'{pat["median_s"] / feat["median_s"]:>18.2f}'
          f'{feat["maxrss_mb"]:>14.0f} /{pat["maxrss_mb"]:>7.0f}{diff:>13.1e}')
    if not (feat['finite'] and pat['finite']):
      print(f'  WARNING: non-finite results in {phase}')
  if FLAGS.workdir:
    benchmarks.write_results(FLAGS.workdir, {'repeats': FLAGS.repeats, 'device': device, 'rows': [
        dict(phase=phase, n=n, rel_diff=diff,
             **benchmarks.without_results(res))
        for phase, n, res, diff in rows]})


if __name__ == '__main__':
  app.run(main)
