"""The one exception type for user mistakes.

Anything the user can fix (a missing folder, a corrupt file, a wrong option) raises `UserError` with one line
that names the problem and the fix. The command line prints that line and exits with status 2; any other
exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
