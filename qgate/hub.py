"""Hub checkpoints: the local snapshot of a Hugging Face repository, without waiting on a hub that is not there.

Offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), or when the hub endpoint does not accept a connection
within a few seconds, only the local cache is read; a checkpoint that is not cached is then one line
naming it and how to provide it. No model library is imported here, so a run fails fast, before torch
loads.
"""

from __future__ import annotations

from pathlib import Path

from qgate.errors import QgateError
from qgate.families import is_hub_id


_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "tokenizer*"]


def snapshot(repo: str, revision: str | None = None) -> Path:
    """The local snapshot folder of hub checkpoint ``repo``: from the HF cache, downloading only when online."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    rev = revision or "main"
    from qgate.offline import offline_reason

    why = offline_reason()
    offline = why is not None
    how = (
        f"put it in the Hugging Face cache (`hf download {repo}"
        + (f" --revision {revision}" if revision else "")
        + "` on a machine with access, HF_HOME pointing there) or pass a local copy with --model DIR"
    )
    try:
        path = snapshot_download(
            repo, revision=revision, allow_patterns=_HUB_PATTERNS, local_files_only=offline
        )
    except LocalEntryNotFoundError:
        raise QgateError(f"checkpoint {repo}@{rev} is not in the local Hugging Face cache and {why}; "
                         f"{how}") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QgateError(f"checkpoint {repo}@{rev} could not be fetched ({first}); {how}") from None
    return Path(path)


def check_model(id_or_path: str, revision: str | None = None) -> None:
    """A --model that names a hub repository is in the local cache or reachable (QgateError otherwise)."""
    if not Path(id_or_path).expanduser().exists() and is_hub_id(id_or_path):
        snapshot(id_or_path, revision)
