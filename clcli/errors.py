"""The one exception type for errors a user can cause.

The CLI turns a `ClcliError` into one line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""
import re


class ClcliError(Exception):
    """A user-facing error: bad input, missing data, unknown model, corrupt file."""


def one_line(error: BaseException, limit: int | None = 300) -> str:
    """`Type: first line of the message`: how a caught library error is quoted inside a ClcliError's single line.
    A first line longer than `limit` keeps its whole sentences up to the limit (always at least the first sentence):
    it is never cut mid-sentence."""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    name = type(error).__name__
    if not lines:
        return name
    text = lines[0]
    if limit is not None and len(text) > limit:
        ends = [m.end() for m in re.finditer(r"[.;!?](?=\s)", text)]
        keep = [e for e in ends if e <= limit] or ends[:1]
        if keep:
            text = text[:keep[-1]].rstrip(".;")
    return f"{name}: {text}"


def is_out_of_memory(error: BaseException) -> bool:
    """A failed allocation, on any device: torch's OutOfMemoryError (CUDA), Python's MemoryError, or the
    RuntimeError the CPU and MPS allocators raise ("can't allocate memory", "MPS backend out of memory")."""
    import torch

    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error)
    return isinstance(error, (RuntimeError, OSError)) and any(
        words in text for words in ("can't allocate memory", "Cannot allocate memory", "out of memory"))
