"""The project's own errors: bad input a user can fix.

Every entry point (``saemnesia_jax.runtime.cli``) prints a ``UserError`` as one or
two lines on stderr and exits with code 2; anything else is a bug and keeps
its traceback. The classes also derive from ``ValueError`` so that callers
of the Python API can catch them as bad values.
"""
from __future__ import annotations


class UserError(ValueError):
  """Bad input (a config value, a file, a path): the message says what is
  wrong, where, and how to fix it."""


class ConfigError(UserError):
  """A config field has a value the stage cannot run with."""


class RunMismatchError(UserError):
  """An output folder was produced under other settings than the config's."""
