"""User-facing errors: `asvd` prints their message as one line (exit status 2), no traceback.

Library code raises these (or `CheckpointError`, a subclass) for anything the caller can fix:
a bad flag, config key, file or shape. The message names the flag, key, file or value at fault.
"""

from __future__ import annotations


class AsvdError(ValueError):
  """Base class of asvd's own errors (a `ValueError`, so `except ValueError` still catches it)."""


class UsageError(AsvdError):
  """A flag, config value or argument is invalid; the message names it."""


class OutputError(AsvdError):
  """An output location cannot be used (not a folder, not writable, or would overwrite a file
  that asvd did not write)."""


__all__ = ["AsvdError", "UsageError", "OutputError"]
