"""Canonical JSON: one spelling per value, so that equal content always hashes equal."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any


def json_safe(obj: Any) -> Any:
    """JSON-ready copy: NaN/inf become None (PostgreSQL's json rejects them), tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if hasattr(obj, "item"):  # numpy / torch scalars
        return json_safe(obj.item())
    return str(obj)


def has_non_finite(obj: Any) -> bool:
    """Somewhere in ``obj`` (nested dicts/lists) a float NaN or inf (what json_safe turns into None)."""
    if isinstance(obj, float):
        return not math.isfinite(obj)
    if isinstance(obj, dict):
        return any(has_non_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(has_non_finite(v) for v in obj)
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            return has_non_finite(obj.item())
        except (TypeError, ValueError):
            return False
    return False


def canonical_json(obj: Any, *, safe: bool = True, ensure_ascii: bool = False) -> str:
    """Sorted keys, no spaces, UTF-8 text.

    Two older spellings keep their own keys byte for byte: ``safe=False`` hands ``obj`` to json.dumps as
    it is instead of through json_safe (NaN stays NaN, non-string keys sort by their own value, a value
    JSON cannot spell raises TypeError); ``ensure_ascii=True`` spells non-ASCII characters as \\u escapes.
    """
    return json.dumps(json_safe(obj) if safe else obj, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=ensure_ascii)


def content_hash(obj: Any, *, safe: bool = True, ensure_ascii: bool = False) -> str:
    """sha256 hex digest of the canonical JSON of ``obj`` (key order and tuples do not matter)."""
    return hashlib.sha256(canonical_json(obj, safe=safe, ensure_ascii=ensure_ascii).encode("utf-8")).hexdigest()
