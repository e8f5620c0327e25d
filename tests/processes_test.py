"""jconvrfm._src.processes in one process (two processes: `multihost_test.py`)."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jconvrfm._src import processes


def test_one_device_per_process_takes_each_process_first_device():
  assert processes.one_device_per_process() == (jax.devices()[0],)
  devices = jax.devices()[::-1]
  assert processes.one_device_per_process(devices) == (devices[0],)


def test_sum_over_one_process_is_the_identity():
  tree = {'a': jnp.arange(6.0).reshape(2, 3), 'b': (np.ones(4, np.float32),)}
  got = processes.sum_over_processes(tree)
  assert got is tree


def test_compute_devices_are_the_first_cpu_device_or_every_local_accelerator():
  local = jax.local_devices()
  want = local[:1] if local[0].platform == 'cpu' else local
  assert processes.compute_devices() == want   # one process
  assert processes.devices_by_process() == [jax.devices()]


def test_devices_or_default_checks_the_list_and_defaults_to_compute_devices():
  assert processes.devices_or_default(None) == processes.compute_devices()
  local = jax.local_devices()
  assert processes.devices_or_default(tuple(local[::-1])) == local[::-1]
  with pytest.raises(TypeError, match='`devices`'):
    processes.devices_or_default(['cpu:0'])
  with pytest.raises(TypeError, match='`devices`'):
    processes.devices_or_default([])
  with pytest.raises(ValueError, match='must not repeat'):
    processes.devices_or_default(local[:1] * 2)


def test_device_accumulators_hand_out_work_to_the_least_loaded_device():
  work = processes.DeviceAccumulators(jax.local_devices())
  n = len(work.devices)
  # Equal costs go round the devices in order; a heavy item is followed by the others.
  assert [work.assign(1.0) for _ in range(2 * n)] == list(range(n)) * 2
  if n > 1:
    assert work.assign(5.0) == 0 and work.assign(1.0) == 1
    # The AGOP's symmetric path: diagonal blocks (cost 0.6) and block pairs (1.0) in its order.
    work = processes.DeviceAccumulators(jax.local_devices()[:2])
    assert [work.assign(c) for c in (0.6, 1.0, 0.6, 1.0, 1.0, 0.6)] == [0, 1, 0, 1, 0, 1]


def test_device_accumulators_sum_every_local_part_once():
  """The gathered sum equals the plain sum of the parts, whatever device each went to
  (checked against numpy in float64, over the conftest's four CPU devices)."""
  rng = np.random.default_rng(0)
  parts = [(rng.normal(size=(3, 2)), rng.normal(size=4)) for _ in range(7)]
  work = processes.DeviceAccumulators(jax.local_devices())
  for k, part in enumerate(parts):
    dev = work.assign(1.0 + k % 3)
    assert work.local(dev)
    work.add(dev, 'acc', jax.device_put(part, work.devices[dev]))
  got = work.gather('acc', lambda: None)
  empty = work.gather('never', lambda: np.zeros(2))
  want = tuple(sum(p[i] for p in parts) for i in range(2))
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-14, atol=1e-14)
    assert g.devices() == {work.home}
  np.testing.assert_array_equal(np.asarray(empty), np.zeros(2))


def test_local_replica_keeps_one_copy_of_replicated_arrays():
  devices = jax.local_devices()[:2]
  mesh = jax.sharding.Mesh(np.array(devices), ('d',))
  spec = lambda *axes: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*axes))
  rep = jax.device_put(jnp.arange(4.0), spec())
  split = jax.device_put(jnp.arange(4.0), spec('d'))
  tree = {'a': jnp.ones(3), 'b': np.zeros(2), 'c': 1.5, 'rep': rep, 'split': split}
  got = processes.local_replica(tree)
  assert got['a'] is tree['a'] and got['b'] is tree['b'] and got['c'] == 1.5
  assert got['split'] is split   # sharded within this process: left as it is
  if len(devices) > 1:
    assert len(got['rep'].devices()) == 1
  np.testing.assert_array_equal(np.asarray(got['rep']), np.arange(4.0))


def test_broadcast_bytes_in_one_process_is_the_read():
  assert processes.broadcast_bytes(lambda: b'abc') == b'abc'
  assert processes.broadcast_bytes(lambda: None) is None

  def fail():
    raise PermissionError('no')

  with pytest.raises(PermissionError):
    processes.broadcast_bytes(fail)


def test_docstring_examples():
  assert doctest.testmod(processes).failed == 0
