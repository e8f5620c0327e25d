"""Multi-process runs of the binaries: `jax.distributed` set-up and a shared workdir.

On a TPU pod slice (or with several GPU processes) the same binary is started on every host
with `--distributed`. Kernel matrices are then computed on every chip of every host
(`jconvrfm.kernel_matrix` over `jax.devices()`, or on CPUs the native kernel's row chunks
shared out among the hosts), and so are the AGOPs (each host computes its share of the
blocks; the sums are all-reduced); `verify_ansatz` trains data parallel over every chip of
every host, evaluates over the same chips, and shares out its CNFA report's AGOP chunks.
Everything else (data loading, solves, featurising) runs redundantly on identical inputs in
every process.

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
  `jax.experimental.multihost_utils.broadcast_one_to_all` (through
  `jconvrfm._src.processes.broadcast_bytes`).
"""

import io
import json
import os
import pathlib
import tempfile
from typing import Any, Dict, List, Optional, Sequence

from absl import flags
from absl import logging
import jax
import numpy as np

from jconvrfm._src import processes


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


def broadcast_json(value: Any) -> Any:
  """Process 0's JSON-serialisable `value`, in every process."""
  return json.loads(processes.broadcast_bytes(lambda: json.dumps(value).encode()).decode())


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
    path = self.root / name

    def read():
      try:
        return path.read_bytes()
      except FileNotFoundError:
        return None
      except OSError as e:   # named in every process by `broadcast_bytes`
        raise OSError(f'{path}: {type(e).__name__}: {e}') from e

    return processes.broadcast_bytes(read)

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


def prepare_workdir(workdir: Optional[str], config: Dict[str, Any], prefix: str = 'run_',
                    ignore: Sequence[str] = ()) -> Workdir:
  """Creates the workdir and writes config.json, or checks that an existing one matches.

  `workdir=None` creates a fresh temporary folder. In a multi-process run process 0 owns the
  folder, and every process receives its config.json (so a mismatch fails everywhere).
  Fields named in `ignore` (dotted, as `config_diff` names them) may differ on a resume,
  e.g. the number of devices; config.json keeps the first run's values.
  """
  wd = Workdir.create(workdir, prefix)
  config = json.loads(json.dumps(config))  # normalise tuples etc.
  saved = wd.read_json('config.json')
  if saved is not None:
    diff = config_diff(saved, config, ignore)
    if diff:
      missing = sorted(set(_flatten(config)) - set(_flatten(saved)))
      older = (f' The saved config.json lacks {missing}: it was written by an older version '
               'of this binary.' if missing else '')
      raise ValueError(
          f'{wd} holds a run with a different configuration (differs in {diff}).{older} '
          'Use a new --workdir or the same flags to resume.')
    logging.info('Resuming the run in %s.', wd)
  else:
    wd.write_json('config.json', config)
  return wd


def config_diff(old: Dict[str, Any], new: Dict[str, Any],
                ignore: Sequence[str] = ()) -> List[str]:
  """Dotted names of the config fields that differ (`'convrfm.rounds'`), except `ignore`d ones.

  Both configs are normalised as JSON (tuples become lists) before comparing.
  """
  old, new = (_flatten(json.loads(json.dumps(c))) for c in (old, new))
  return sorted(k for k in set(old) | set(new)
                if k not in ignore and old.get(k, None) != new.get(k, None))


def _flatten(d: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
  """`{'a': {'b': 1}}` -> `{'a.b': 1}`, so config differences name the nested field."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = v
  return out
