"""Work shared out among devices and among the processes of a multi-host run.

In a multi-process run (after `jax.distributed.initialize()`), the library's block loops
(the kernel-predictor AGOP, the native CPU kernel matrices, the CNFA report's AGOPs) run the
same host loop in every process, each process working on its share of the blocks
(`DeviceAccumulators`); `sum_over_processes` then adds the processes' partial sums, and every
process receives the same total. In a single-process run it returns its input.
`compute_devices` is those loops' (and training's) default device list, `devices_or_default`
checks a caller's list against it. `broadcast_bytes` gives every process what process 0
read (a checkpoint, a config file), so hosts need not share a filesystem.

References:
  JAX multi-process guide: https://docs.jax.dev/en/latest/multi_process.html (global arrays
  from per-process data, `jax.make_array_from_single_device_arrays`;
  `jax.experimental.multihost_utils.broadcast_one_to_all`).
"""

import functools
from typing import Callable, List, Optional, Sequence, Tuple

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jconvrfm._src import checks


def devices_by_process() -> List[List[jax.Device]]:
  """`jax.devices()` grouped by process: entry `p` lists process `p`'s devices, in order."""
  out = [[] for _ in range(jax.process_count())]
  for d in jax.devices():
    out[d.process_index].append(d)
  return out


def compute_devices() -> List[jax.Device]:
  """The default devices of block loops and training: each process's local accelerators, or
  its first CPU device, for every process in turn.

  Simulated CPU devices (`--xla_force_host_platform_device_count`) share the same cores, and
  XLA already splits each fused loop over all of them: on a 2-core CPU an 800-image AGOP took
  14.8 s on two such devices against 14.0 s on one, and each extra device compiles the
  programs again.
  """
  return [d for own in devices_by_process()
          for d in (own[:1] if own[0].platform == 'cpu' else own)]


def devices_or_default(devices: Optional[Sequence[jax.Device]] = None) -> List[jax.Device]:
  """The devices of a computation shared among processes: `devices` checked, or the default.

  Default (`compute_devices()`): in a single-process run, every local device
  of an accelerator, or the first CPU device; in a multi-process run the same per process,
  across all processes. A list must hold a device of this process, and a list that spans
  several processes a device of every process (all of them take part in the sums); a list of
  this process's devices alone computes the whole result in this process.
  """
  if devices is None:
    return compute_devices()
  devices = checks.check_devices(devices)
  owners = {d.process_index for d in devices}
  if jax.process_index() not in owners:
    raise ValueError(
        f'`devices` must include a device of this process ({jax.process_index()}), got '
        f'devices of process(es) {sorted(owners)}.')
  if len(owners) > 1 and owners != set(range(jax.process_count())):
    raise ValueError(
        '`devices` that span several processes must include a device of every process '
        f'(0 .. {jax.process_count() - 1}), got devices of processes {sorted(owners)}.')
  return devices


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


def local_replica(tree):
  """`tree` with each replicated array on several devices replaced by its copy on one device
  of this process; other leaves are returned as they are.

  E.g. a training state replicated over the devices of all processes (or of several local
  devices), for evaluation or a report computed in each process on its own. Arrays sharded
  over devices of other processes cannot be copied here and raise `ValueError`.
  """
  def one(a):
    if not isinstance(a, jax.Array) or len(a.sharding.device_set) == 1:
      return a
    if a.is_fully_replicated:
      return a.addressable_data(0)
    if not a.is_fully_addressable:
      raise ValueError('expected arrays replicated over their devices or held by this '
                       f'process, got one sharded as {a.sharding}.')
    return a
  return jax.tree.map(one, tree)


class DeviceAccumulators:
  """Per-device running sums of a block loop's parts, for spreading its work over devices.

  Work items (block pairs, sample blocks, image chunks) are handed to the device with the
  least work so far (ties: the lower index), in a fixed order, so the assignment and hence
  the result depend only on the inputs and the devices. Each device keeps its own copies of
  the inputs it reads (`put`) and of the accumulators it updates (`add`, created on first
  use); `gather` adds the copies of one accumulator. With one device this is the plain
  sequential loop. jax dispatches asynchronously, so the devices run concurrently while the
  host loop hands out the next items.

  Devices of several processes (multi-host, see `devices_or_default`): every process runs the
  same host loop and so makes the same assignment, but works only on the items of its own
  devices (`local(dev)`); `gather` then adds the processes' sums with one all-reduce
  (`sum_over_processes`), so every process receives the same total.

  >>> work = DeviceAccumulators(jax.local_devices()[:1])
  >>> for k in range(4):
  ...   dev = work.assign(1.0)
  ...   if work.local(dev):
  ...     work.add(dev, 'sum', work.put(dev, 'x', lambda: np.arange(3.0)) * k)
  >>> np.asarray(work.gather('sum', lambda: np.zeros(3))).tolist()
  [0.0, 6.0, 12.0]
  """

  def __init__(self, devices: Sequence[jax.Device]):
    self.devices = list(devices)
    here = jax.process_index()
    self._local = [d.process_index == here for d in self.devices]
    # Where this process's sums are added (the first of its devices in `devices`).
    self.home = self.devices[self._local.index(True)]
    self.load = [0.0] * len(self.devices)
    self._inputs = {}
    self.acc = [{} for _ in self.devices]
    self.scratch = [None] * len(self.devices)

  def assign(self, cost: float) -> int:
    """The index (into `devices`) of the device that takes the next item, of `cost`."""
    dev = min(range(len(self.devices)), key=lambda k: (self.load[k], k))
    self.load[dev] += cost
    return dev

  def local(self, dev: int) -> bool:
    """Whether device `dev` (an index into `devices`) belongs to this process."""
    return self._local[dev]

  def add(self, dev: int, key, part) -> None:
    """Adds `part` (a pytree) to device `dev`'s running sum `key` (created by the first part)."""
    acc = self.acc[dev]
    acc[key] = jax.tree.map(jnp.add, acc[key], part) if key in acc else part

  def put(self, dev: int, key, make: Callable[[], object]):
    """The inputs `make()` under `key` on device `dev`, transferred once."""
    if (dev, key) not in self._inputs:
      self._inputs[(dev, key)] = jax.device_put(make(), self.devices[dev])
    return self._inputs[(dev, key)]

  def gather(self, key, zeros: Callable[[], object]):
    """Sum over devices of accumulator `key` (a pytree), on `home`; `zeros()` if none.

    With devices of several processes this is a collective: every process must call it, for
    the same keys in the same order.
    """
    parts = [jax.device_put(acc[key], self.home) for acc in self.acc if key in acc]
    if not parts:
      total = jax.device_put(zeros(), self.home)
    else:
      total = functools.reduce(lambda a, b: jax.tree.map(jnp.add, a, b), parts)
    return sum_over_processes(total, self.devices)   # unchanged in one process


# Payload kinds of `broadcast_bytes`.
_ABSENT, _PRESENT, _ERROR = 0, 1, 2


def _bucket(n: int) -> int:
  """A payload length rounded up to a power of two (at least 64), so that broadcasts of
  payloads of similar size share one compiled program."""
  return max(64, 1 << max(0, n - 1).bit_length())


def broadcast_bytes(read: Callable[[], Optional[bytes]]) -> Optional[bytes]:
  """`read()` called in process 0, its result (bytes, or None) returned in every process.

  A collective: every process must call it. An `OSError` raised by `read` in process 0 is
  raised in every process (naming it), rather than leaving the others waiting. In a
  single-process run this is `read()`.
  """
  if jax.process_count() == 1:
    return read()
  kind, payload = _ABSENT, b''
  if jax.process_index() == 0:
    try:
      got = read()
      if got is not None:
        kind, payload = _PRESENT, bytes(got)
    except OSError as e:
      kind, payload = _ERROR, f'{type(e).__name__}: {e}'.encode()
  header = multihost_utils.broadcast_one_to_all(np.array([kind, len(payload)], np.int32))
  kind, size = int(header[0]), int(header[1])
  buf = np.zeros(_bucket(size), np.uint8)
  if jax.process_index() == 0:
    buf[:size] = np.frombuffer(payload, np.uint8)
  data = multihost_utils.broadcast_one_to_all(buf)
  payload = np.asarray(data, np.uint8)[:size].tobytes()
  if kind == _ERROR:
    raise OSError(f'Process 0 could not read: {payload.decode()}')
  return payload if kind == _PRESENT else None
