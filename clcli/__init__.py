"""clcli: collaborative learning of timm classifiers with Mutual Knowledge Bases.

Public API: `clcli.probe.plan(...)`, `clcli.mkb.attach(...)`, `clcli.load(path)`.
Heavy libraries (torch, timm, datasets) are imported inside the functions that need them.
"""
from clcli.version import __version__


def load(path: str, *, device: str = "cpu"):
    """Load a network exported by `clcli export --split`: the timm model with its MKB halves attached."""
    from clcli.export import load as _load

    return _load(path, device=device)


__all__ = ["load", "__version__"]
