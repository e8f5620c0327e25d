"""The test suite's own set-up: orphaned compilation-cache folders are removed."""

import os
import subprocess
import sys
import tempfile

from tests import conftest


def test_orphaned_cache_folders_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  prefix = conftest._CACHE_PREFIX  # pylint: disable=protected-access
  orphan = tmp_path / f'{prefix}{dead.pid}-abc'
  live = tmp_path / f'{prefix}{os.getpid()}-def'
  unnamed = tmp_path / f'{prefix}xyz'  # an older run's folder without a process id: kept
  other = tmp_path / f'unrelated-{dead.pid}-abc'
  for path in (orphan, live, unnamed, other):
    (path / 'sub').mkdir(parents=True)
    (path / 'sub' / 'entry').write_bytes(b'x')
  conftest._remove_orphaned_caches()  # pylint: disable=protected-access
  assert not orphan.exists()
  assert live.exists() and unnamed.exists() and other.exists()
