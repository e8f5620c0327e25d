"""Multi-process runs of the kernel binaries: `jax.distributed` set-up and a shared workdir.

On a TPU pod slice (or with several GPU processes) the same binary is started on every host
with `--distributed`. Kernel matrices are then computed on every chip of every host
(`jconvrfm.kernel_matrix` over `jax.devices()`, or on CPUs the native kernel's row chunks
shared out among the hosts), and so are the AGOPs (each host computes its share of the
blocks; the sums are all-reduced); everything else (solves, featurising) runs redundantly on
identical inputs in every process.

The workdir belongs to process 0. It alone creates, reads and writes files there; what it
reads (`config.json`, finished rounds, sampled filters) is broadcast to the other processes.
So every process resumes from the same round, and all of them raise the same error for a
workdir with another configuration. The hosts need not share a filesystem. A failed read on
process 0 (a permission error, say) is raised in every process rather than left to hang
them. A failed write raises on process 0 only; the other processes then stop when jax's
coordination service loses it.

Single-process runs (the default) read and write directly, with the same atomic writes.

References:
  JAX multi-process guide: https://docs.jax.dev/en/latest/multi_process.html
  `jax.experimental.multihost_utils.broadcast_one_to_all`.
"""

import io
import json
import os
import pathlib
import tempfile
from typing import Any, Dict, Optional

from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np


def define_flags(flag_values: flags.FlagValues):
  """Registers `--distributed`, `--coordinator_address`, `--num_processes`, `--process_id`."""
  flags.DEFINE_bool(
      'distributed', False,
      'Call jax.distributed.initialize() before computing: one process per host of a TPU pod '
      'slice (start the same command on every host), or several GPU processes. On TPU VMs and '
      'in SLURM, Open MPI or Kubernetes jobs jax finds the cluster itself; elsewhere give '
      '--coordinator_address, --num_processes and --process_id (on CPUs also '
      '--jax_cpu_collectives_implementation=gloo). Process 0 alone writes the workdir.',
      flag_values=flag_values)
  flags.DEFINE_string('coordinator_address', None,
                      'With --distributed: host:port of process 0 (default: auto-detected).',
                      flag_values=flag_values)
  flags.DEFINE_integer('num_processes', None,
                       'With --distributed: number of processes (default: auto-detected).',
                       flag_values=flag_values)
  flags.DEFINE_integer('process_id', None,
                       'With --distributed: this process\'s index (default: auto-detected).',
                       flag_values=flag_values)


def initialize(values) -> None:
  """Calls `jax.distributed.initialize` if `values.distributed`; checks the related flags.

  Must run before any jax computation in the process.
  """
  given = {k: getattr(values, k) for k in ('coordinator_address', 'num_processes', 'process_id')
           if getattr(values, k) is not None}
  if not values.distributed:
    if given:
      raise ValueError(f'--{", --".join(sorted(given))} need --distributed.')
    return
  if 'num_processes' in given and given['num_processes'] < 1:
    raise ValueError(f'--num_processes must be positive, got {given["num_processes"]}.')
  if 'process_id' in given and not 0 <= given['process_id'] < given.get(
      'num_processes', given['process_id'] + 1):
    raise ValueError(f'--process_id must be in [0, --num_processes), got '
                     f'{given["process_id"]}.')
  jax.distributed.initialize(**given)
  logging.info('Process %d of %d; %d local and %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def is_writer() -> bool:
  """Whether this process writes the workdir (process 0)."""
  return jax.process_index() == 0


# Payload kinds of `_broadcast_bytes`.
_ABSENT, _PRESENT, _ERROR = 0, 1, 2


def _bucket(n: int) -> int:
  """A payload length rounded up to a power of two (at least 64), so that broadcasts of files
  of similar size share one compiled program."""
  return max(64, 1 << max(0, n - 1).bit_length())


def _broadcast_bytes(kind: int, payload: bytes) -> tuple:
  """Process 0's `(kind, payload)` in every process (a no-op in a single process)."""
  if jax.process_count() == 1:
    return kind, payload
  header = multihost_utils.broadcast_one_to_all(
      np.array([kind, len(payload)], np.int32))
  kind, size = int(header[0]), int(header[1])
  buf = np.zeros(_bucket(size), np.uint8)
  if is_writer():
    buf[:size] = np.frombuffer(payload, np.uint8)
  data = multihost_utils.broadcast_one_to_all(buf)
  return kind, np.asarray(data, np.uint8)[:size].tobytes()


def broadcast_json(value: Any) -> Any:
  """Process 0's JSON-serialisable `value`, in every process."""
  payload = json.dumps(value).encode() if is_writer() else b''
  return json.loads(_broadcast_bytes(_PRESENT, payload)[1].decode())


class Workdir:
  """A run's output folder, written by process 0 and read through it by every process.

  Names are relative to `root`. Writes are atomic (a temporary file renamed into place), so
  a run killed mid-write leaves either the old file or the new one, never a torn one.

  Example:
    >>> import tempfile
    >>> wd = Workdir.create(tempfile.mkdtemp())
    >>> wd.write_json('config.json', {'q': 3})
    >>> wd.read_json('config.json'), wd.exists('round_0.npz')
    ({'q': 3}, False)
  """

  def __init__(self, root):
    self.root = pathlib.Path(root)

  @classmethod
  def create(cls, root: Optional[str], prefix: str = 'run_') -> 'Workdir':
    """The workdir `root`, created by process 0 (a fresh temporary folder if `root` is None)."""
    if root is None:
      root = broadcast_json(tempfile.mkdtemp(prefix=prefix) if is_writer() else None)
    elif is_writer():
      pathlib.Path(root).mkdir(parents=True, exist_ok=True)
    return cls(root)

  def __truediv__(self, name: str) -> pathlib.Path:
    return self.root / name

  def __str__(self) -> str:
    return str(self.root)

  # Reads: process 0 reads, every process receives.

  def read_bytes(self, name: str) -> Optional[bytes]:
    """The file's bytes, or None if it does not exist."""
    kind, payload = _ABSENT, b''
    if is_writer():
      try:
        payload = (self.root / name).read_bytes()
        kind = _PRESENT
      except FileNotFoundError:
        pass
      except OSError as e:
        kind, payload = _ERROR, f'{type(e).__name__}: {e}'.encode()
    kind, payload = _broadcast_bytes(kind, payload)
    if kind == _ERROR:
      raise OSError(f'Process 0 could not read {self.root / name}: {payload.decode()}')
    return payload if kind == _PRESENT else None

  def read_text(self, name: str) -> Optional[str]:
    data = self.read_bytes(name)
    return None if data is None else data.decode()

  def read_json(self, name: str) -> Any:
    text = self.read_text(name)
    return None if text is None else json.loads(text)

  def load_npz(self, name: str) -> Optional[Dict[str, np.ndarray]]:
    """All arrays of an `.npz` file, or None if it does not exist."""
    data = self.read_bytes(name)
    if data is None:
      return None
    with np.load(io.BytesIO(data)) as z:
      return {k: z[k] for k in z.files}

  def load_npy(self, name: str) -> Optional[np.ndarray]:
    data = self.read_bytes(name)
    return None if data is None else np.load(io.BytesIO(data))

  def exists(self, name: str) -> bool:
    return bool(broadcast_json((self.root / name).is_file() if is_writer() else None))

  # Writes: process 0 only.

  def write_bytes(self, name: str, payload: bytes) -> None:
    if not is_writer():
      return
    path = self.root / name
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + '.tmp')
    try:
      with os.fdopen(fd, 'wb') as f:
        f.write(payload)
      os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.unlink(tmp)
      raise

  def write_text(self, name: str, text: str) -> None:
    self.write_bytes(name, text.encode())

  def write_json(self, name: str, obj: Any) -> None:
    self.write_text(name, json.dumps(obj, indent=1, sort_keys=True) + '\n')

  def save_npz(self, name: str, **arrays) -> None:
    if is_writer():
      buf = io.BytesIO()
      np.savez(buf, **arrays)
      self.write_bytes(name, buf.getvalue())

  def save_npy(self, name: str, array) -> None:
    if is_writer():
      buf = io.BytesIO()
      np.save(buf, np.asarray(array))
      self.write_bytes(name, buf.getvalue())

  def save_figure(self, name: str, fig, **savefig_kwargs) -> None:
    """Saves a matplotlib figure (PNG by the name's suffix) and closes it."""
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    try:
      if is_writer():
        buf = io.BytesIO()
        fig.savefig(buf, format=pathlib.Path(name).suffix.lstrip('.') or 'png',
                    **savefig_kwargs)
        self.write_bytes(name, buf.getvalue())
    finally:
      plt.close(fig)
