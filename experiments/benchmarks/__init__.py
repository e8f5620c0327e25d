"""Benchmark binaries; each prints a table with a slower reference path in the same run."""

import json
import pathlib
from typing import Any, Dict


def write_results(workdir: str, results: Dict[str, Any]) -> pathlib.Path:
  """Writes `results` as `workdir/results.json` (the `--workdir` of every benchmark)."""
  path = pathlib.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  out = path / 'results.json'
  out.write_text(json.dumps(results, indent=2))
  return out
