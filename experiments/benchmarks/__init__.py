"""Benchmark binaries; each prints a table with a slower reference path in the same run."""

import json
import os
import pathlib
import subprocess
import sys
from typing import Any, Dict, Optional, Sequence

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
