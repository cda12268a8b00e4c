"""The one exception type for errors a user can cause.

The CLI turns a `ClcliError` into one line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""


class ClcliError(Exception):
    """A user-facing error: bad input, missing data, unknown model, corrupt file."""
