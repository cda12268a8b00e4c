"""Deciding at once whether the Hugging Face Hub can be reached, before timm or `datasets` try (and retry for half
a minute). Without a network the process switches to the Hub's offline mode, so files already in the local Hub cache
still load and anything else fails at once; the caller (models: pretrained weights, data: a Hub dataset id) then says
what needed the Hub and the local alternative."""
from __future__ import annotations

import os
import sys
from urllib.parse import urlparse

_TRUE = {"1", "on", "yes", "true"}
_reason: str | None = None
_checked = False


def offline_reason(timeout: float = 3.0) -> str | None:
    """Why the Hub cannot be reached (HF_HUB_OFFLINE set, or no connection to its endpoint within `timeout`
    seconds), None when it can. Checked once per process."""
    global _reason, _checked
    if _checked:
        return _reason
    _checked = True
    if any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        _reason = "HF_HUB_OFFLINE is set"
        return _reason
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):  # a proxy decides; let the libraries try
        return None
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        _reason = f"no connection to {host}:{port} ({type(e).__name__})"
        _go_offline()
    return _reason


def _go_offline() -> None:
    """The Hub's offline mode for the rest of this process (cached files only, no retries)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")  # read once at import: set it too if imported
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_HUB_OFFLINE = True
        if hasattr(config, "HF_DATASETS_OFFLINE"):
            config.HF_DATASETS_OFFLINE = True

