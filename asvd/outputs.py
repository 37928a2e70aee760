"""Output folders: checked before any work, never overwriting what asvd did not write.

`OutputDir(path, files)` is created before anything is loaded or compiled. It makes the folder,
proves it writable (a probe file), and refuses if any of the files the command will write already
exists there but was not written by asvd (asvd records what it writes in `.asvd_outputs`). So a
bad `--out` fails in a second with one line, and a user's own `video.mp4` is never replaced.
Files are written atomically (a temporary name, then a rename).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable

from asvd.errors import OutputError

MANIFEST = ".asvd_outputs"


class OutputDir:
  """A checked output folder.

  Args:
    path: the folder (created if missing).
    files: names of the files the command will write (checked against overwriting).
    flag: the command-line flag that named the folder, for error messages.
  """

  def __init__(self, path: str, files: Iterable[str], *, flag: str = "--out"):
    self.root, self.flag = os.fspath(path), flag
    self._check_location()
    ours = self._manifest()
    foreign = [f for f in files if os.path.lexists(os.path.join(self.root, f)) and f not in ours]
    if foreign:
      raise OutputError(
        f"{flag} {self.root}: {', '.join(sorted(foreign))} already exist(s) and asvd did not write "
        "them; choose another folder or move them away"
      )

  def _check_location(self) -> None:
    p = os.path.abspath(self.root)
    if os.path.exists(p) and not os.path.isdir(p):
      raise OutputError(f"{self.flag} {self.root}: exists and is not a folder")
    probe = p
    while not os.path.exists(probe):  # the nearest existing ancestor must be a folder
      probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
      raise OutputError(f"{self.flag} {self.root}: {probe} is a file, not a folder")
    try:
      os.makedirs(p, exist_ok=True)
      with tempfile.TemporaryFile(dir=p):
        pass
    except OSError as e:
      raise OutputError(f"{self.flag} {self.root}: cannot write there ({e.strerror or e})") from e

  def _manifest(self) -> set[str]:
    try:
      with open(os.path.join(self.root, MANIFEST)) as f:
        return set(json.load(f))
    except (OSError, ValueError):
      return set()

  def path(self, name: str) -> str:
    """The path of output `name`, recorded as asvd's (so a later run may replace it)."""
    ours = self._manifest()
    if name not in ours:
      ours.add(name)
      write_text_atomic(os.path.join(self.root, MANIFEST), json.dumps(sorted(ours)))
    return os.path.join(self.root, name)

  def write_json(self, name: str, obj) -> str:
    path = self.path(name)
    write_text_atomic(path, json.dumps(obj, indent=2))
    return path

  def save_npy(self, name: str, array) -> str:
    import numpy as np  # noqa: PLC0415

    path = self.path(name)
    fd, tmp = tempfile.mkstemp(prefix="." + name + ".", dir=self.root)
    try:
      with os.fdopen(fd, "wb") as f:
        np.save(f, array)
      publish(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    return path


def publish(tmp: str, path: str) -> None:
  """Renames a finished temporary file into place with the usual permissions (umask applied;
  `mkstemp` creates files readable by their owner only)."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o666 & ~umask)
  os.replace(tmp, path)


def write_text_atomic(path: str, text: str) -> None:
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=folder)
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    publish(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


__all__ = ["OutputDir", "write_text_atomic", "publish", "MANIFEST"]
