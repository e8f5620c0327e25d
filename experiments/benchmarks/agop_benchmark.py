r"""Benchmark: patch AGOP of a vanilla CNN, closed form (`conv_agop`) vs generic (`patch_agop`).

Network (plain JAX, random He init, float32): `depth` x [Conv 3x3 VALID, no bias, ReLU] with
`width` channels, Flatten, Dense to `num_classes` logits, on `num_images` random
`image_size` x `image_size` x `channels` images (uniform pixels; only timing matters). For every
conv layer both variants compute the same d x d patch AGOP (sum over positions and all logits)
over all images, processed in blocks of `block_size` images (the layer's input activations of a
block are computed in both variants, so that shared cost is included in both):

* closed: per-example gradients of the logits w.r.t. the layer's pre-activation
  (`vmap(jacrev)`, shape (block, classes, H', W', width)), then `jconvrfm.conv_agop`
  (`W Sigma W^T`);
* generic: `jconvrfm.patches` of the layer input, then `jconvrfm.patch_agop` by autodiff through
  the explicit patch tensor (the reference definition; chunked per `--agop_chunk` examples).

Times are medians (and minima) of `--repeats` full passes after one compiling pass. Peak memory of
each (variant, layer) is measured in a fresh subprocess: host peak RSS (VmHWM) and, where the backend
reports it, the device's `peak_bytes_in_use`; a baseline subprocess that only imports, builds
the parameters and one input block gives the fixed overhead. The two results are compared
(relative Frobenius error) in the same run.

Launch (full size: about 4.5 minutes wall on one H200, memory subprocesses included; two CPU
cores would need hours, use --num_images there):

  PYTHONPATH=. python experiments/benchmarks/agop_benchmark.py --num_images=10000

A quick CPU run:

  PYTHONPATH=. python experiments/benchmarks/agop_benchmark.py --num_images=64 \
      --block_size=32 --repeats=3
"""

import functools
import json
import statistics
import sys
import time
from typing import Any, Dict, List

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchmarks
import jconvrfm

_NUM_IMAGES = flags.DEFINE_integer('num_images', 10_000, 'Images in the AGOP.')
_BLOCK_SIZE = flags.DEFINE_integer('block_size', 500, 'Images per outer block (both variants).')
_AGOP_CHUNK = flags.DEFINE_integer(
    'agop_chunk', 0, 'chunk_size of patch_agop (examples per Jacobian chunk); 0: its default.')
_WIDTH = flags.DEFINE_integer('width', 64, 'Channels of every conv layer.')
_DEPTH = flags.DEFINE_integer('depth', 4, 'Number of conv layers.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 28, 'Image height and width.')
_CHANNELS = flags.DEFINE_integer('channels', 1, 'Image channels.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 10, 'Logits (all are summed in the AGOP).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed passes after the compiling pass.')
_LAYERS = flags.DEFINE_list('layers', [], 'Conv layers to benchmark (0-based); empty: all.')
_VARIANTS = flags.DEFINE_list('variants', ['closed', 'generic'], 'Variants to run.')
_MEASURE_MEMORY = flags.DEFINE_bool('measure_memory', True,
                                    'Measure peak memory per variant in subprocesses.')
_PRECISION = flags.DEFINE_enum(
    'matmul_precision', 'default', ['default', 'high', 'highest'],
    'jax_default_matmul_precision of the network (the AGOP reductions inside jconvrfm always use '
    'HIGHEST). "default" allows TF32 convolutions on recent NVIDIA GPUs.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of parameters and images.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'If set, write results.json there.')
_WORKER = flags.DEFINE_string('worker', None,
                              'Internal: JSON "<variant>:<layer>" or "baseline" memory worker.')

Q = 3


# --------------------------------------------------------------------------------------------
# The network (single example (H, W, C) unless stated otherwise).
# --------------------------------------------------------------------------------------------


def init_params(key, depth, width, channels, image_size, num_classes):
  keys = jax.random.split(key, depth + 1)
  kernels = []
  c_in = channels
  for l in range(depth):
    std = np.sqrt(2.0 / (Q * Q * c_in))
    kernels.append(std * jax.random.normal(keys[l], (Q, Q, c_in, width), jnp.float32))
    c_in = width
  side = image_size - depth * (Q - 1)
  dense = jax.random.normal(keys[-1], (side * side * width, num_classes), jnp.float32)
  return {'kernels': kernels, 'dense': dense / np.sqrt(side * side * width)}


def conv(h, kernel):
  """Batched VALID conv, NHWC x HWIO."""
  return jax.lax.conv_general_dilated(h, kernel, (1, 1), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def logits_from_preact(z, params, layer):
  """Logits of one example from conv `layer`'s pre-activation z (H', W', width)."""
  h = jax.nn.relu(z)[None]
  for kernel in params['kernels'][layer + 1:]:
    h = jax.nn.relu(conv(h, kernel))
  return h.reshape(-1) @ params['dense']


def generic_fn(layer, patches_one, params):
  """Logits of one example as a function of conv `layer`'s input patches (H', W', d)."""
  kernel = params['kernels'][layer]
  z = patches_one @ kernel.reshape(-1, kernel.shape[-1])
  return logits_from_preact(z, params, layer)


@functools.lru_cache(maxsize=None)
def generic_fn_for(layer):
  """One function object per layer, so `patch_agop` compiles once per layer and shape."""
  return functools.partial(generic_fn, layer)


@functools.partial(jax.jit, static_argnames=('layer', 'block', 'shape'))
def layer_input_block(key, index, params, layer, block, shape):
  """Random images of block `index` (block, *shape) pushed through the layers before `layer`."""
  h = jax.random.uniform(jax.random.fold_in(key, index), (block,) + shape, jnp.float32)
  for kernel in params['kernels'][:layer]:
    h = jax.nn.relu(conv(h, kernel))
  return h


@functools.partial(jax.jit, static_argnames=('layer',))
def preact_grads_block(h, params, layer):
  """(block, classes, H', W', width) gradients of the logits w.r.t. the pre-activation."""
  z = conv(h, params['kernels'][layer])
  jac = jax.jacrev(lambda zi: logits_from_preact(zi, params, layer))
  return jax.vmap(jac)(z)


def blocks(num_images, block_size):
  start = 0
  while start < num_images:
    yield start // block_size, min(block_size, num_images - start)
    start += block_size


def run_variant(variant, layer, params, key, cfg) -> jax.Array:
  """The AGOP of conv `layer` over all images (sum over positions and logits), (d, d)."""
  shape = (cfg['image_size'], cfg['image_size'], cfg['channels'])
  total = None
  for index, size in blocks(cfg['num_images'], cfg['block_size']):
    h = layer_input_block(key, index, params, layer, size, shape)
    if variant == 'closed':
      deltas = preact_grads_block(h, params, layer)
      g = jconvrfm.conv_agop(params['kernels'][layer], deltas)
    elif variant == 'generic':
      chunk = cfg['agop_chunk'] or None
      g = jconvrfm.patch_agop(generic_fn_for(layer), jconvrfm.patches(h, Q), params,
                              chunk_size=chunk)
    else:
      raise ValueError(f'Unknown variant {variant!r}; expected "closed" or "generic".')
    total = g * size if total is None else total + g * size
  return (total / cfg['num_images']).block_until_ready()


# --------------------------------------------------------------------------------------------
# Memory workers and the timed main run.
# --------------------------------------------------------------------------------------------


def device_peak_mb():
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if not stats or 'peak_bytes_in_use' not in stats:
    return None
  return stats['peak_bytes_in_use'] / 2**20


def worker(spec, params, key, cfg):
  if spec == 'baseline':
    layer_input_block(key, 0, params, 0, min(cfg['block_size'], cfg['num_images']),
                      (cfg['image_size'], cfg['image_size'], cfg['channels'])).block_until_ready()
  else:
    variant, layer = spec.split(':')
    run_variant(variant, int(layer), params, key, cfg)
  print(json.dumps({'host_peak_mb': host_peak_mb(), 'device_peak_mb': device_peak_mb()}))


host_peak_mb = benchmarks.host_peak_mb


def measure_in_subprocess(spec) -> Dict[str, Any]:
  """Runs `worker(spec)` in a fresh process with this run's flags."""
  argv = [a for a in sys.argv[1:] if not a.startswith('--worker')]
  return benchmarks.run_worker('experiments.benchmarks.agop_benchmark', spec, args=argv)


def fmt(value, spec='.1f'):
  return '-' if value is None else format(value, spec)


def main(argv):
  del argv
  jax.config.update('jax_default_matmul_precision', _PRECISION.value)
  cfg = dict(num_images=_NUM_IMAGES.value, block_size=_BLOCK_SIZE.value,
             agop_chunk=_AGOP_CHUNK.value, image_size=_IMAGE_SIZE.value,
             channels=_CHANNELS.value)
  key = jax.random.PRNGKey(_SEED.value)
  params = init_params(jax.random.fold_in(key, 1), _DEPTH.value, _WIDTH.value, _CHANNELS.value,
                       _IMAGE_SIZE.value, _NUM_CLASSES.value)
  data_key = jax.random.fold_in(key, 2)
  if _WORKER.value:
    worker(json.loads(_WORKER.value), params, data_key, cfg)
    return

  layers = [int(l) for l in _LAYERS.value] or list(range(_DEPTH.value))
  variants = list(_VARIANTS.value)
  device = jax.devices()[0]
  logging.info('device: %s (%s), %d images, block %d', device.device_kind, device.platform,
               cfg['num_images'], cfg['block_size'])
  rows: List[Dict[str, Any]] = []
  baseline = measure_in_subprocess('baseline') if _MEASURE_MEMORY.value else None
  for layer in layers:
    results = {}
    for variant in variants:
      t0 = time.perf_counter()
      results[variant] = np.asarray(run_variant(variant, layer, params, data_key, cfg))
      compile_s = time.perf_counter() - t0
      times = []
      for _ in range(_REPEATS.value):
        t0 = time.perf_counter()
        run_variant(variant, layer, params, data_key, cfg)
        times.append(time.perf_counter() - t0)
      mem = measure_in_subprocess(f'{variant}:{layer}') if _MEASURE_MEMORY.value else {}
      row = dict(layer=layer, variant=variant, d=int(results[variant].shape[0]),
                 median_s=statistics.median(times), min_s=min(times), first_pass_s=compile_s,
                 host_peak_mb=mem.get('host_peak_mb'), device_peak_mb=mem.get('device_peak_mb'))
      rows.append(row)
      logging.info('%s', row)
    if 'closed' in results and 'generic' in results:
      a, b = results['generic'], results['closed']
      err = float(np.linalg.norm(a - b) / np.linalg.norm(b))
      for row in rows[-len(variants):]:
        row['rel_err_generic_vs_closed'] = err

  by_key = {(r['layer'], r['variant']): r for r in rows}
  print(f'\nPatch AGOP benchmark: {device.device_kind} ({device.platform}), '
        f'{cfg["num_images"]} images {cfg["image_size"]}x{cfg["image_size"]}x{cfg["channels"]}, '
        f'{_DEPTH.value} conv layers of width {_WIDTH.value}, {_NUM_CLASSES.value} logits, '
        f'block {cfg["block_size"]}, matmul precision {_PRECISION.value}, '
        f'median of {_REPEATS.value} after compilation.')
  if baseline:
    print(f'Baseline process (imports, params, one input block): host '
          f'{fmt(baseline["host_peak_mb"])} MB, device {fmt(baseline["device_peak_mb"])} MB.')
  header = (f'{"layer":>5} {"d":>5} {"variant":>8} {"median s":>9} {"min s":>8} '
            f'{"1st pass s":>10} {"host MB":>8} {"dev MB":>8} {"t ratio":>8} {"rel err":>9}')
  print(header)
  print('-' * len(header))
  for r in rows:
    closed = by_key.get((r['layer'], 'closed'))
    ratio = r['median_s'] / closed['median_s'] if closed else None
    print(f'{r["layer"]:>5} {r["d"]:>5} {r["variant"]:>8} {r["median_s"]:>9.3f} '
          f'{r["min_s"]:>8.3f} {r["first_pass_s"]:>10.2f} {fmt(r["host_peak_mb"]):>8} '
          f'{fmt(r["device_peak_mb"]):>8} {fmt(ratio, ".2f"):>8} '
          f'{fmt(r.get("rel_err_generic_vs_closed"), ".2e"):>9}')
  print('t ratio: median time / closed-form median time of the same layer.')
  if _WORKDIR.value:
    benchmarks.write_results(_WORKDIR.value, {
        'device': device.device_kind, 'platform': device.platform, 'config': cfg,
        'baseline': baseline, 'rows': rows})


if __name__ == '__main__':
  app.run(main)
