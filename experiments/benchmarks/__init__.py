"""Benchmark binaries; each prints a table with a slower reference path in the same run."""

import json
import os
import pathlib
import resource
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Optional, Sequence

_ROOT = pathlib.Path(__file__).resolve().parents[2]


def write_results(workdir: str, results: Dict[str, Any]) -> pathlib.Path:
  """Writes `results` as `workdir/results.json` (the `--workdir` of every benchmark)."""
  path = pathlib.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  out = path / 'results.json'
  out.write_text(json.dumps(results, indent=2))
  return out


def run_worker(module: str, spec: Any, *, args: Sequence[str] = (),
               env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
  """Runs `python -m module --worker=<spec as JSON> *args` in a fresh process from the repo root.

  The worker prints its result as JSON on its last stdout line; a fresh process per
  measurement gives each its own compilation and peak-memory figures. `env` adds to (and
  overrides) the environment. Raises `RuntimeError` with the worker's stderr if it fails.
  """
  full_env = dict(os.environ)
  full_env['PYTHONPATH'] = str(_ROOT) + os.pathsep + full_env.get('PYTHONPATH', '')
  full_env.update(env or {})
  proc = subprocess.run([sys.executable, '-m', module, '--worker=' + json.dumps(spec), *args],
                        cwd=_ROOT, env=full_env, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f'{module} worker failed for {spec}:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def host_peak_mb() -> float:
  """Peak resident memory of this process image (VmHWM), else ru_maxrss.

  `ru_maxrss` survives `fork` + `exec` on Linux (a child starts at its parent's peak), so the
  per-image high-water mark from /proc is preferred.
  """
  try:
    for line in pathlib.Path('/proc/self/status').read_text().splitlines():
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) / 1024  # kB
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux.


def time_and_report(call: Callable[[], Any], repeats: int, out: str, **fields) -> None:
  """A worker's measurement: `call()` once (compiling), then `repeats` timed calls.

  Saves the result as `out` (`.npy`) and prints one JSON line (`run_worker` reads it): the
  median and first-call seconds, the peak RSS in MB, whether the result is finite, the
  device kind, and `fields`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  result = np.asarray(jax.block_until_ready(call()))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  np.save(out, result)
  print(json.dumps({'median_s': float(np.median(times)), 'compile_s': compile_s,
                    'maxrss_mb': host_peak_mb(), 'finite': bool(np.all(np.isfinite(result))),
                    'device': str(jax.devices()[0].device_kind), **fields}))


def run_paths(module: str, spec: Dict[str, Any], paths: Sequence[str], tmp: str,
              env: Optional[Callable[[str], Dict[str, str]]] = None) -> Dict[str, Dict[str, Any]]:
  """`run_worker` once per path of one phase: `{path: worker result + its float64 'result'}`.

  Each worker gets `spec` plus `path` and an `out` file in `tmp` (for `time_and_report`);
  `env(path)` adds to its environment.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  res = {}
  for path in paths:
    full = dict(spec, path=path, out=os.path.join(tmp, f'{spec["phase"]}_{path}.npy'))
    res[path] = run_worker(module, full, env=None if env is None else env(path))
    res[path]['result'] = np.load(full['out']).astype(np.float64)
  return res


def without_results(res: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
  """`run_paths`'s results without the arrays (for `results.json`)."""
  return {path: {k: v for k, v in r.items() if k != 'result'} for path, r in res.items()}
