r"""Benchmark: ConvRFM's two costly phases shared out among processes, as on a multi-host slice.

Each configuration runs as `P` processes of one `jax.distributed` run (gloo CPU collectives
over localhost), each pinned to its own `--cores_per_process` cores, so that `P` processes
stand for `P` hosts. Phases:

* `agop`: the kernel-predictor AGOP. Every process computes its share of the blocks (block
  pairs of the symmetric XLA path, chunks of samples of the native path) and the sums are
  all-reduced (`predictor_agop._DeviceAccumulators`).
* `kernel`: the symmetric `n x n` training kernel matrix with a metric, as ConvRFM computes
  it: the native path's row chunks shared out among processes and all-reduced
  (`fused.whole_kernel_matrix`), or the XLA path's tiles over the devices of all processes
  (`tiling.kernel_matrix`).

The slow reference in the same run is the same computation in ONE process on
`--cores_per_process` cores; the table gives the median wall time of `--repeats` calls after
compilation (process 0's clock, every repetition started at a barrier and ended by the
all-reduce or all-gather), the speed-up over one process, the parallel efficiency (speed-up
/ P), and the relative Frobenius difference from the one-process result (float32; the AGOP's
summation order changes, the kernel matrices are bitwise equal).

Data: `--n` random 42 x 42 x 1 images (uniform in [0, 1], as noisy MNIST's scale), 10
classes of normal coefficients, a random PSD metric, all images as AGOP samples (the ConvRFM
default, so the XLA path is the symmetric one). About eight minutes on a 2-core CPU:

  python -m experiments.benchmarks.multihost_scaling
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_list('processes', ['1', '2'], 'Numbers of processes to time (1 is the reference '
                  'and is always run).')
flags.DEFINE_list('phases', ['agop', 'kernel'], 'Phases to time: agop and/or kernel.')
flags.DEFINE_list('paths', ['native', 'xla'], 'Paths: native (the C++ CPU path) and/or xla.')
flags.DEFINE_integer('n', 800, 'Training images (all of them are the AGOP samples).')
flags.DEFINE_integer('image_size', 42, 'Images are image_size x image_size x 1.')
flags.DEFINE_integer('depth', 3, 'CNTK depth.')
flags.DEFINE_integer('cores_per_process', 1, 'CPU cores pinned to each process.')
flags.DEFINE_integer('repeats', 3, 'Timed repetitions (median reported).')
flags.DEFINE_string('workdir', None, 'If set, write results.json there.')
flags.DEFINE_string('worker', None, 'Internal: JSON spec of one process of a run.')


def _worker(spec):
  """One process: pins its cores, joins the run, times the AGOP; process 0 prints JSON."""
  pid, count, cpp = spec['process_id'], spec['processes'], spec['cores_per_process']
  os.sched_setaffinity(0, set(range(pid * cpp, (pid + 1) * cpp)))   # before jax's threads
  os.environ['JCONVRFM_NATIVE_THREADS'] = str(cpp)
  # The XLA path throughout (the fused tile program would otherwise call the native kernel).
  os.environ['JCONVRFM_NATIVE'] = '1' if spec['path'] == 'native' else '0'
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  from experiments import benchmarks  # pylint: disable=g-import-not-at-top
  from jconvrfm._src import checks  # pylint: disable=g-import-not-at-top
  from jconvrfm._src import convrfm as crfm  # pylint: disable=g-import-not-at-top
  from jconvrfm._src import predictor_agop as pa  # pylint: disable=g-import-not-at-top
  from jconvrfm._src import tiling  # pylint: disable=g-import-not-at-top
  from jconvrfm._src.kernels import fused  # pylint: disable=g-import-not-at-top
  if count > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(f'localhost:{spec["port"]}', count, pid)
  rng = np.random.default_rng(0)
  n, size = spec['n'], spec['image_size']
  x = rng.uniform(size=(n, size, size, 1)).astype(np.float32)
  alpha = rng.normal(size=(n, 10)).astype(np.float32) / n
  f = rng.normal(size=(9, 9))
  metric = (f @ f.T / 9).astype(np.float32)
  depth, pad, ntk = spec['depth'], checks.Padding.SAME, fused.Kind.NTK
  native = spec['path'] == 'native'
  kernel = fused.GramConvKernel(depth, 3, pad, 1, ntk)

  def agop():
    return pa.predictor_agop_from_grams(kernel, x, alpha, z_indices=np.arange(n),
                                        patch_size=3, padding='SAME', metric=metric,
                                        native=native)

  def kernel_matrix():
    if native:
      return fused.whole_kernel_matrix(x, None, metric, depth, 3, pad, ntk)
    # ConvRFM's tile program, on the devices of all processes.
    return tiling.kernel_matrix(crfm._FusedTile(depth, 3, pad, ntk), x, None,  # pylint: disable=protected-access
                                kernel_args=(metric,))

  call = agop if spec['phase'] == 'agop' else kernel_matrix
  result = np.asarray(call())            # compiles
  times = []
  for k in range(spec['repeats']):
    if count > 1:
      multihost_utils.sync_global_devices(f'repeat {k}')
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  if pid == 0:
    np.save(spec['out'], result)
    print(json.dumps({'median_s': float(np.median(times)), 'times_s': times,
                      'maxrss_mb': benchmarks.host_peak_mb(),
                      'finite': bool(np.all(np.isfinite(result)))}))


def _free_port() -> str:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return str(s.getsockname()[1])


def _run(phase: str, path: str, count: int, tmp: str) -> dict:
  """Launches one run of `count` processes; process 0's measurement and its result."""
  port = _free_port()
  out = os.path.join(tmp, f'{phase}_{path}_{count}.npy')
  env = dict(os.environ)
  root = str(pathlib.Path(__file__).resolve().parents[2])
  env['PYTHONPATH'] = root + os.pathsep + env.get('PYTHONPATH', '')
  env['XLA_FLAGS'] = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                              if 'xla_force_host_platform_device_count' not in f)
  procs = []
  for pid in range(count):
    spec = dict(process_id=pid, processes=count, cores_per_process=FLAGS.cores_per_process,
                port=port, n=FLAGS.n, image_size=FLAGS.image_size, depth=FLAGS.depth,
                phase=phase, path=path, repeats=FLAGS.repeats, out=out)
    procs.append(subprocess.Popen(
        [sys.executable, '-m', 'experiments.benchmarks.multihost_scaling',
         '--worker=' + json.dumps(spec)], cwd=root, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True))
  try:
    outputs = [p.communicate(timeout=1800) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outputs):
    if p.returncode != 0:
      raise RuntimeError(f'{phase} {path} with {count} process(es) failed:\n{err[-3000:]}')
  row = json.loads(outputs[0][0].strip().splitlines()[-1])
  row['result'] = np.load(out).astype(np.float64)
  return row


def main(argv):
  del argv
  if FLAGS.worker:
    _worker(json.loads(FLAGS.worker))
    return
  counts = sorted({1} | {int(c) for c in FLAGS.processes})
  if counts[0] < 1:
    raise ValueError(f'--processes must be positive integers, got {FLAGS.processes}.')
  cores = len(os.sched_getaffinity(0))
  if counts[-1] * FLAGS.cores_per_process > cores:
    raise ValueError(
        f'--processes={counts[-1]} x --cores_per_process={FLAGS.cores_per_process} needs '
        f'{counts[-1] * FLAGS.cores_per_process} cores; this process may use {cores}.')
  bad = sorted(set(FLAGS.paths) - {'native', 'xla'})
  if bad:
    raise ValueError(f'--paths must be native and/or xla, got {bad}.')
  bad = sorted(set(FLAGS.phases) - {'agop', 'kernel'})
  if bad:
    raise ValueError(f'--phases must be agop and/or kernel, got {bad}.')
  print(f'{FLAGS.n} images {FLAGS.image_size}x{FLAGS.image_size}x1, q=3, depth '
        f'{FLAGS.depth}, SAME, 10 classes, float32; {FLAGS.cores_per_process} core(s) per '
        f'process; median of {FLAGS.repeats} after compiling')
  print(f'{"phase":>7} {"path":>7} {"processes":>10} {"median s":>9} {"speed-up":>9} '
        f'{"efficiency":>11} {"rel. diff":>10}')
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for phase in FLAGS.phases:
      for path in FLAGS.paths:
        ref = None
        for count in counts:
          row = _run(phase, path, count, tmp)
          ref = ref or row
          speedup = ref['median_s'] / row['median_s']
          diff = float(np.linalg.norm(row['result'] - ref['result']) /
                       np.linalg.norm(ref['result']))
          print(f'{phase:>7} {path:>7} {count:>10} {row["median_s"]:>9.2f} {speedup:>9.2f} '
                f'{speedup / count:>11.2f} {diff:>10.2e}', flush=True)
          rows.append(dict(phase=phase, path=path, processes=count,
                           median_s=row['median_s'], times_s=row['times_s'],
                           speedup=speedup, rel_diff=diff, finite=row['finite'],
                           maxrss_mb=row['maxrss_mb']))
  if FLAGS.workdir:
    from experiments import benchmarks  # pylint: disable=g-import-not-at-top
    benchmarks.write_results(FLAGS.workdir, {
        'n': FLAGS.n, 'image_size': FLAGS.image_size, 'depth': FLAGS.depth,
        'cores_per_process': FLAGS.cores_per_process, 'repeats': FLAGS.repeats,
        'rows': rows})


if __name__ == '__main__':
  app.run(main)
