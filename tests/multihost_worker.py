"""One process of a two-process run of the shared block loops, for `multihost_test.py`.

`python -m tests.multihost_worker PORT PROCESS_ID OUT_DIR [MODE]` joins a 2-process run (gloo
CPU collectives; the caller sets two CPU devices per process). Mode `agop` (the default)
computes, once spread over both processes and once in this process alone,

* the same AGOPs through every path of `predictor_agop` (spread: the default devices, and for
  one path every device of both processes; alone: `devices=[a local device]`),
* native CPU kernel matrices, symmetric and rectangular (`fused.native_kernel_matrix` with
  `across_processes` True and False), where the native library is available,

and writes them to `OUT_DIR/process<ID>.npz`, with the number of block programs this process
ran for each (counted by wrapping them) and the error that a device list without a device of
this process raises.

Mode `train` (`train_main`) trains a ResNet with batch norm data parallel over the default
devices (one per process) and over all four devices of both processes (uninterrupted; and,
on the default devices, stopped after 4 steps then resumed, with process 0's
checkpoints in `OUT_DIR/workdir` and process 1 given `OUT_DIR/process1_workdir`, which it
must not create) and over one device of this process alone (in `OUT_DIR/alone_workdir<ID>`),
and computes the CNFA report's
layer AGOPs spread over both processes (the default devices and all four devices) and
alone, counting the chunk programs each process ran; results in `OUT_DIR/train<ID>.npz`.
"""

import collections
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jconvrfm._src import checks
from jconvrfm._src import cnfa_report as report_lib
from jconvrfm._src import predictor_agop as pa
from jconvrfm._src import train as train_lib
from jconvrfm._src.kernels import fused

_CALLS = collections.Counter()


def _count(module, name):
  fn = getattr(module, name)

  def counted(*args, **kwargs):
    _CALLS[name] += 1
    return fn(*args, **kwargs)

  setattr(module, name, counted)


def _smooth_kernel(gram, sq1, sq2):
  """A Gram kernel for the autodiff path (smooth everywhere)."""
  return jnp.sum(jnp.exp(-(sq1[:, None] + sq2[None, :] - 2 * gram) / 4.0) * (1.0 + gram),
                 axis=(2, 3))


def _problem(seed, n, channels, size=8, classes=3, dtype=np.float64):
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=(n, size, size, channels)).astype(dtype)
  alpha = rng.normal(size=(n, classes)).astype(dtype)
  d = 9 * channels
  f = rng.normal(size=(d, d))
  return x, alpha, (f @ f.T / d).astype(dtype)


def main(port: str, process_id: int, out_dir: str, mode: str = 'agop'):
  jax.config.update('jax_enable_x64', True)
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(f'localhost:{port}', 2, process_id)
  if mode == 'train':
    train_main(process_id, out_dir)
    return
  for name in ('_v_hand_written', '_symmetric_pair', '_w_block', '_native_rows',
               '_grads_autodiff'):
    _count(pa, name)
  _count(fused, '_native_rows')
  alone = [jax.local_devices()[0]]
  ntk = fused.canonical_kind('ntk')
  same, valid = checks.canonical_padding('SAME'), checks.canonical_padding('VALID')
  results = {}

  def run(label, fn, **kwargs):
    for mode, devices in (('spread', kwargs.pop('spread_devices', None)), ('alone', alone)):
      _CALLS.clear()
      g = fn(devices=devices, **kwargs)
      results[f'{label}_{mode}'] = np.asarray(g)
      results[f'{label}_{mode}_calls'] = np.asarray(sum(_CALLS.values()))

  x, alpha, metric = _problem(0, n=40, channels=2)
  kernel = fused.GramConvKernel(2, 3, same, 2, ntk)
  idx = np.random.default_rng(1).permutation(40)
  common = dict(patch_size=3, padding='SAME', metric=metric, native=False)
  # Symmetric path, blocks of 8: 15 block pairs; also over all four devices of both processes.
  run('symmetric', pa.predictor_agop_from_grams, kernel_from_grams=kernel, x_train=x,
      alpha=alpha, z_indices=idx, train_block=8, **common)
  run('symmetric4', pa.predictor_agop_from_grams, kernel_from_grams=kernel, x_train=x,
      alpha=alpha, z_indices=idx, train_block=8, spread_devices=jax.devices(), **common)
  # One-directional path: 5 sample blocks of 8 (the last padded).
  run('one_way', pa.predictor_agop_from_grams, kernel_from_grams=kernel, x_train=x,
      alpha=alpha, z=x[:37], train_block=16, z_block=8, **common)
  # Features path (d = 90 > FEATURE_MIN_DIM): sample blocks of 6.
  xf, alphaf, metricf = _problem(2, n=24, channels=10, size=6)
  run('features', pa.predictor_agop_from_grams,
      kernel_from_grams=fused.GramConvKernel(2, 3, valid, 10, ntk), x_train=xf,
      alpha=alphaf, z_indices=np.arange(24), patch_size=3, padding='VALID', metric=metricf,
      z_block=6)
  # Native CPU path (float32), where the native library is available.
  if pa.native_lib.available():
    x32, alpha32, metric32 = _problem(3, n=30, channels=1, dtype=np.float32)
    run('native', pa.predictor_agop_from_grams,
        kernel_from_grams=fused.GramConvKernel(2, 3, same, 1, ntk), x_train=x32,
        alpha=alpha32, z_indices=np.arange(30), patch_size=3, padding='SAME', metric=metric32,
        native=True)
  # Autodiff path: 4 sample blocks of 3.
  xa, alphaa, metrica = _problem(4, n=6, channels=1, size=6)
  run('autodiff', pa.predictor_agop_autodiff,
      patch_kernel_fn=pa.GramKernelOnPatches(_smooth_kernel), x_train=xa, alpha=alphaa, z=xa[:5] * 0.5 + xa[1:] * 0.5, patch_size=3, padding='SAME',
      metric=metrica, z_block=2)
  # Native kernel matrices, 30 x 30 symmetric and 30 x 20: 4 row chunks, 2 per process.
  if pa.native_lib.available():
    x32, _, metric32 = _problem(5, n=50, channels=1, size=10, dtype=np.float32)
    for label, x2 in (('kernel_sym', None), ('kernel_rect', x32[30:])):
      for mode, across in (('spread', True), ('alone', False)):
        _CALLS.clear()
        k = fused.native_kernel_matrix(x32[:30], x2, metric32, 3, 3, same, ntk,
                                       across_processes=across)
        results[f'{label}_{mode}'] = np.asarray(k)
        results[f'{label}_{mode}_calls'] = np.asarray(sum(_CALLS.values()))
  # A device list without a device of this process is refused, with the argument named.
  foreign = [d for d in jax.devices() if d.process_index != process_id][:1]
  try:
    pa.predictor_agop_from_grams(kernel, x, alpha, z_indices=idx, devices=foreign, **common)
    results['foreign_error'] = np.asarray('')
  except ValueError as e:
    results['foreign_error'] = np.asarray(str(e))
  np.savez(f'{out_dir}/process{process_id}.npz', **results)


def _leaves(prefix, tree):
  return {f'{prefix}_{i}': np.asarray(a) for i, a in enumerate(jax.tree.leaves(tree))}


def train_main(process_id: int, out_dir: str):
  from jconvrfm.models import ResNet, VanillaCNN  # pylint: disable=g-import-not-at-top
  x = np.asarray(jax.random.normal(jax.random.key(0), (48, 8, 8, 1), jnp.float32))
  y = (x[:, :4].mean((1, 2, 3)) > x[:, 4:].mean((1, 2, 3))).astype(np.int32)
  model = ResNet(2, width=4, small_inputs=True, stage_sizes=(1, 1))  # has batch norm
  kw = dict(num_classes=2, epochs=3, batch_size=16, optimizer='sgd', learning_rate=0.05,
            seed=3, progress=False, eval_images=x[:20], eval_labels=y[:20])
  workdir = f'{out_dir}/workdir' if process_id == 0 else f'{out_dir}/process1_workdir'
  results = {}
  spread = train_lib.train(model, x, y, **kw)   # default: a CPU device of each process
  all4 = train_lib.train(model, x, y, devices=jax.devices(), **kw)
  part = train_lib.train(model, x, y, workdir=workdir, max_steps=4, **kw)
  resumed = train_lib.train(model, x, y, workdir=workdir, **kw)
  # One device of this process: a run of its own, in a workdir of its own.
  alone = train_lib.train(model, x, y, devices=jax.local_devices()[:1],
                          workdir=f'{out_dir}/alone_workdir{process_id}', **kw)
  for label, r in (('spread', spread), ('all4', all4), ('resumed', resumed), ('alone', alone)):
    results.update(_leaves(f'state_{label}', r.state))
    results[f'loss_{label}'] = np.asarray([h['train_loss'] for h in r.history])
    results[f'eval_{label}'] = np.asarray([h['eval_accuracy'] for h in r.history])
    results[f'devices_{label}'] = np.asarray(
        sorted(d.id for d in jax.tree.leaves(r.state)[0].sharding.device_set))
  results['part_step'] = np.asarray(int(part.state.step))
  results['resumed_history_epochs'] = np.asarray([h['epoch'] for h in resumed.history])

  # The CNFA report's AGOPs (float64), chunks counted per process.
  calls = collections.Counter()
  make = report_lib._chunk_agops_fn  # pylint: disable=protected-access

  def counting(*args):
    fn = make(*args)

    def counted(variables, images):
      calls['chunks'] += 1
      return fn(variables, images)
    return counted

  report_lib._chunk_agops_fn = counting  # pylint: disable=protected-access
  cnn = VanillaCNN(3, width=4, depth=2)
  xs = np.asarray(jax.random.uniform(jax.random.key(1), (22, 8, 8, 1)), np.float64)
  variables = jax.tree.map(lambda a: np.asarray(a, np.float64),
                           cnn.init(jax.random.key(2), xs[:1]))
  for label, devices in (('default', None), ('all4', jax.devices()),
                         ('alone', jax.local_devices()[:1])):
    calls.clear()
    g = report_lib.layer_agops(cnn, variables, xs, chunk_size=4, devices=devices)
    for name, a in g.items():
      results[f'agop_{label}_{name}'] = np.asarray(a)
    results[f'agop_{label}_calls'] = np.asarray(calls['chunks'])
  np.savez(f'{out_dir}/train{process_id}.npz', **results)


if __name__ == '__main__':
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3], *sys.argv[4:])
