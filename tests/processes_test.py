"""jconvrfm._src.processes in one process (two processes: `multihost_test.py`)."""

import jax
import jax.numpy as jnp
import numpy as np

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
  assert processes.compute_devices(all_processes=False) == want
  assert processes.compute_devices(all_processes=True) == want   # one process
