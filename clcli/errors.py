"""The one exception type for errors a user can cause.

The CLI turns a `ClcliError` into one line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""


class ClcliError(Exception):
    """A user-facing error: bad input, missing data, unknown model, corrupt file."""


def one_line(error: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, at most `limit` characters: how a caught library error is quoted inside
    a ClcliError's single line."""
    text = str(error).strip().splitlines()
    return (f"{type(error).__name__}: {text[0]}" if text else type(error).__name__)[:limit]
