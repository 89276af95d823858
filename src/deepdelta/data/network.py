"""Cheap reachability probes, so an offline machine fails in seconds instead of hanging in retries."""

from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.request
from collections.abc import Iterator

PROBE_TIMEOUT_S = float(os.environ.get("DEEPDELTA_PROBE_TIMEOUT", "5"))


def url_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True if a server answers a HEAD request to ``url`` (any HTTP status counts: it answered).

    urllib honours the *_PROXY environment variables, unlike a raw socket probe.
    """
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def hf_offline() -> bool:
    """Whether the user asked the Hugging Face libraries to stay offline."""
    return any(
        os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


@contextlib.contextmanager
def honour_hf_offline() -> Iterator[None]:
    """Make ``datasets``/``huggingface_hub`` obey HF_HUB_OFFLINE even if it was set after they were imported.

    Both read the variable once at import; a notebook or test that sets it later would otherwise still
    go to the network and wait out its retries.
    """
    if not hf_offline():
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub

    saved = (hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved
