"""Exceptions shared across the packages."""
from __future__ import annotations


class InputError(ValueError):
    """Input that does not fit the job: a missing or malformed file, or a setting that disagrees with what
    is on disk. The message names the input; the `tbg` command reports it as a usage error (exit status 2)."""
