r"""Benchmark: the fast kernel-predictor AGOP vs the reference-style per-class autodiff.

For the ConvRFM predictor `f_c(z) = sum_i alpha_ic K_M(x_i, z)` (the paper's CNTK, fused Gram
engine) it times, after compilation, the median of `--repeats` runs of

* `fast`: `predictor_agop_from_grams` (one reverse pass of `sum_i K(x_i, z)` w.r.t. the Gram
  entries for all classes, then a contraction with the training patches);
* `reference`: the reference code's approach done in JAX: for every class c separately, a
  reverse pass of `f_c` w.r.t. an explicit `(H', W', d)` patch tensor of each sample image
  (vmapped over samples), outer products summed.

and prints a table with both times, their ratio and the relative Frobenius difference of the
two AGOPs. About two minutes on a 2-core CPU:

  python -m experiments.benchmarks.convrfm_benchmark
"""

import functools
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchmarks
from jconvrfm._src import checks
from jconvrfm._src import convrfm as crfm
from jconvrfm._src import patches as patches_lib
from jconvrfm._src import predictor_agop as pa
from jconvrfm._src.kernels import fused

FLAGS = flags.FLAGS
flags.DEFINE_list('sizes', ['32:8', '64:16'], 'n_train:s pairs to time.')
flags.DEFINE_integer('image_size', 20, 'Images are image_size x image_size x 1.')
flags.DEFINE_integer('depth', 2, 'CNTK depth.')
flags.DEFINE_integer('classes', 10, 'Number of classes.')
flags.DEFINE_integer('repeats', 3, 'Timed repetitions (median reported).')
flags.DEFINE_string('workdir', None, 'If set, write results.json there (every row).')


@functools.partial(jax.jit, static_argnums=(0, 1))
def _reference_grads(gram_fn, c, px, sqx, alpha, pz, metric):
  """Per-class gradients `(b, H', W', d)` of f_c w.r.t. explicit patch tensors (one class)."""
  mpx = px @ metric

  def f(pz_one):
    gram = jnp.einsum('mhwd,hwd->mhw', mpx, pz_one)[:, None]
    sqz = jnp.sum((pz_one @ metric) * pz_one, -1)[None]
    return alpha[:, c] @ gram_fn(gram, sqx, sqz)[:, 0]

  return jax.vmap(jax.grad(f))(pz)


def reference_agop(gram_fn, x, alpha, z, q, metric):
  px = patches_lib.patches(x, q)
  pz = patches_lib.patches(z, q)
  sqx = jnp.sum((px @ metric) * px, -1)
  d = px.shape[-1]
  acc = jnp.zeros((d, d), x.dtype)
  for c in range(alpha.shape[1]):  # one reverse pass per class, as the reference code
    g = _reference_grads(gram_fn, c, px, sqx, alpha, pz, metric).reshape(-1, d)
    acc = acc + g.T @ g
  return acc / z.shape[0]


def _median_time(fn, repeats):
  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv):
  del argv
  q = 3
  gram_fn = crfm._gram_kernel(  # pylint: disable=protected-access
      FLAGS.depth, q, checks.Padding.VALID, 1, fused.Kind.NTK)
  rng = np.random.default_rng(0)
  print(f'devices: {jax.devices()}; images {FLAGS.image_size}x{FLAGS.image_size}x1, q={q}, '
        f'depth={FLAGS.depth}, {FLAGS.classes} classes, float32, median of {FLAGS.repeats}')
  print(f'{"n_train":>8} {"s":>5} {"fast s":>9} {"reference s":>12} {"ratio":>7} '
        f'{"rel. diff":>10}')
  rows = []
  for spec in FLAGS.sizes:
    n, s = (int(v) for v in spec.split(':'))
    x = jnp.asarray(rng.normal(size=(n, FLAGS.image_size, FLAGS.image_size, 1)), jnp.float32)
    z = jnp.asarray(rng.normal(size=(s, FLAGS.image_size, FLAGS.image_size, 1)), jnp.float32)
    alpha = jnp.asarray(rng.normal(size=(n, FLAGS.classes)), jnp.float32)
    f = rng.normal(size=(9, 9))
    metric = jnp.asarray(f @ f.T / 9, jnp.float32)
    fast = lambda: pa.predictor_agop_from_grams(gram_fn, x, alpha, z, patch_size=q,
                                                metric=metric)
    ref = lambda: reference_agop(gram_fn, x, alpha, z, q, metric)
    t_fast = _median_time(fast, FLAGS.repeats)
    t_ref = _median_time(ref, FLAGS.repeats)
    a, b = np.asarray(fast(), np.float64), np.asarray(ref(), np.float64)
    diff = np.linalg.norm(a - b) / np.linalg.norm(b)
    print(f'{n:>8} {s:>5} {t_fast:>9.3f} {t_ref:>12.3f} {t_ref / t_fast:>7.1f} {diff:>10.2e}')
    rows.append(dict(n_train=n, s=s, fast_s=t_fast, reference_s=t_ref, rel_diff=float(diff)))
  if FLAGS.workdir:
    benchmarks.write_results(FLAGS.workdir, {
        'device': jax.devices()[0].device_kind, 'image_size': FLAGS.image_size,
        'depth': FLAGS.depth, 'classes': FLAGS.classes, 'repeats': FLAGS.repeats,
        'rows': rows})


if __name__ == '__main__':
  app.run(main)
