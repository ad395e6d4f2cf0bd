"""Atomic file writes: a temporary file in the target's directory, then a
rename, so neither a crash nor a reader running at the same time ever sees
half a report or a truncated picture.
"""

from __future__ import annotations

import os
import pathlib
import tempfile


def _current_umask() -> int:
  mask = os.umask(0)  # the only way to read it is to set it; put it straight back
  os.umask(mask)
  return mask


# Temporary files are created private (0600); the finished file gets the mode
# that a plain open() would give it, so others sharing a run directory can read it.
_FILE_MODE = 0o666 & ~_current_umask()


def write_bytes(path: str | pathlib.Path, data: bytes) -> pathlib.Path:
  """Writes `data` to `path` atomically; creates the parent directory."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
  try:
    with os.fdopen(handle, 'wb') as file:
      file.write(data)
    os.chmod(temporary, _FILE_MODE)
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.unlink(temporary)
    raise
  return path


def write_text(path: str | pathlib.Path, text: str) -> pathlib.Path:
  return write_bytes(path, text.encode('utf-8'))
