"""The installed transformers' name for a model's KV cache, in arguments and in outputs.

transformers 5.24 renamed every model's `past_key_values` argument and output field to `cache` (the
old name is deprecated, to be removed in 5.40). The name is decided here, once, by the installed
release, not by reading a model's signature, so that FastLM and KV-cache quantization pass the cache
under the name the model expects and trigger no deprecation warning.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import metadata

from packaging.version import Version

RENAMED_IN = Version("5.24.0")


@lru_cache(maxsize=1)
def cache_argument() -> str:
    """The keyword a transformers model's forward takes its KV cache by (also the output's field)."""
    return "cache" if Version(metadata.version("transformers")) >= RENAMED_IN else "past_key_values"


def output_cache(outputs):
    """The KV cache a model's forward returned."""
    return getattr(outputs, cache_argument())
