"""Whether the Hugging Face Hub can be reached, decided once per process, and what that means for a
run: offline (declared with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE, or found by
one short connection attempt) turns the libraries' offline modes on, so that they read their caches
instead of retrying the network for minutes, and a hub dataset a suite names but the cache lacks is
reported at once, before any model loads."""

from __future__ import annotations

import functools
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

from qgate.errors import QgateError

PROBE_TIMEOUT_S = 3.0
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = ("1", "true", "yes", "on")


def declared_offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in OFFLINE_VARIABLES)


def _hub_answers() -> bool:
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # through a proxy a direct connection says nothing; let the libraries try
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def offline_reason() -> str | None:
    """Why the hub is treated as offline (declared, or unreachable), or None when it answers."""
    return _offline_reason()


def hub_offline() -> bool:
    """True when the hub is declared or found unreachable; then the libraries' offline modes are on."""
    return _offline_reason() is not None


@functools.lru_cache(maxsize=1)
def _offline_reason() -> str | None:
    if declared_offline():
        reason = "offline is declared (" + ", ".join(v for v in OFFLINE_VARIABLES if os.environ.get(v)) + ")"
    elif not _hub_answers():
        reason = "the Hugging Face Hub cannot be reached"
    else:
        return None
    if reason:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        # libraries read these at import: modules already imported get the value set directly
        if "huggingface_hub.constants" in sys.modules:
            sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
        if "datasets.config" in sys.modules:
            sys.modules["datasets.config"].HF_DATASETS_OFFLINE = True
            sys.modules["datasets.config"].HF_HUB_OFFLINE = True
    return reason


def dataset_cached(dataset: str) -> bool:
    """Some copy of hub dataset ``dataset`` ("owner/name [config]") is in the hub or datasets cache."""
    repo = dataset.split()[0]
    hf_home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()
    hub_cache = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or hf_home / "hub")
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or hf_home / "datasets")
    return ((hub_cache / f"datasets--{repo.replace('/', '--')}").is_dir()
            or (datasets_cache / repo.replace("/", "___")).is_dir())


def check_hub_data(tasks) -> None:
    """Offline, each suite task reading a named hub dataset must find it in the local cache."""
    hub_tasks = [t for t in tasks if not t.offline]
    if not hub_tasks or not hub_offline():
        return
    for t in hub_tasks:
        dataset = t.data.get("dataset")
        if dataset and not dataset_cached(str(dataset)):
            how = _offline_reason()
            raise QgateError(f"task {t.name}: hub dataset {dataset} is not in the local cache and {how}; "
                             "fill the cache on a machine with access (HF_HOME), or use the offline suite: "
                             "--suite smoke")
