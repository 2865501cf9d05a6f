"""The one exception type for user mistakes, and how its messages name what the user sets.

Anything the user can fix (a missing folder, a corrupt file, a wrong option) raises `UserError` with one line
that names the problem and the fix. The command line prints that line and exits with status 2; any other
exception is a bug and keeps its traceback.

A message names a setting with `param("images_dir")` or `param("overwrite", True)`: from Python it reads as the
API's parameter (`images_dir`, `overwrite=True`), and the command line rewrites each such name to its option
(`--images`, `--overwrite`), so the same message is right for both callers.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def param(name: str, value: object = None) -> str:
    """A parameter (or `stage.key` configuration value) as an error message names it: `name` or `name=value`."""
    return f"`{name}`" if value is None else f"`{name}={value!r}`"
