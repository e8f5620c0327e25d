"""Sums over the processes of a multi-host run, for work shared out among hosts.

In a multi-process run (after `jax.distributed.initialize()`), the library's block loops
(the kernel-predictor AGOP, the native CPU kernel matrices) run the same host loop in every
process, each process working on its share of the blocks; `sum_over_processes` then adds the
processes' partial sums, and every process receives the same total. In a single-process run
it returns its input. `compute_devices` is those loops' (and training's) default device list.

References:
  JAX multi-process guide: https://docs.jax.dev/en/latest/multi_process.html (global arrays
  from per-process data, `jax.make_array_from_single_device_arrays`).
"""

import functools
from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def compute_devices(all_processes: bool) -> List[jax.Device]:
  """The default devices of block loops and training: each process's local accelerators, or
  its first CPU device, for this process or for every process in turn.

  Simulated CPU devices (`--xla_force_host_platform_device_count`) share the same cores, and
  XLA already splits each fused loop over all of them: on a 2-core CPU an 800-image AGOP took
  14.8 s on two such devices against 14.0 s on one, and each extra device compiles the
  programs again.
  """
  out = []
  for p in range(jax.process_count()) if all_processes else [jax.process_index()]:
    own = [d for d in jax.devices() if d.process_index == p]
    out += own[:1] if own[0].platform == 'cpu' else own
  return out


def one_device_per_process(devices: Optional[Sequence[jax.Device]] = None
                           ) -> Tuple[jax.Device, ...]:
  """The first device of each process among `devices` (default `jax.devices()`), by process."""
  firsts = {}
  for d in jax.devices() if devices is None else devices:
    firsts.setdefault(d.process_index, d)
  return tuple(firsts[p] for p in sorted(firsts))


@functools.lru_cache(maxsize=None)
def _sum_program(devices: Tuple[jax.Device, ...]):
  mesh = Mesh(np.array(devices), ('processes',))
  return (NamedSharding(mesh, PartitionSpec('processes')),
          jax.jit(lambda t: jax.tree.map(lambda a: jnp.sum(a, axis=0), t),
                  out_shardings=NamedSharding(mesh, PartitionSpec())))


def sum_over_processes(tree, devices: Optional[Sequence[jax.Device]] = None):
  """The sum over processes of `tree`, a pytree of arrays with the same shapes in each process.

  A collective over the processes of `devices` (default: all processes; every one of them
  must call it, with the same shapes): one device per process (its first in `devices`)
  holds its process's term, and one jitted sum over the process axis, replicated, is XLA's
  all-reduce. Every process receives the same total, as jax arrays on that device. With the
  devices of one process this returns `tree` unchanged.
  """
  mesh_devices = one_device_per_process(devices)
  if len(mesh_devices) == 1:
    return tree
  home = {d.process_index: d for d in mesh_devices}[jax.process_index()]
  sharding, program = _sum_program(mesh_devices)

  def global_array(x):
    x = jax.device_put(x, home)
    return jax.make_array_from_single_device_arrays(
        (len(mesh_devices),) + x.shape, sharding, [x[None]])

  total = program(jax.tree.map(global_array, tree))
  return jax.tree.map(lambda a: a.addressable_data(0), total)
