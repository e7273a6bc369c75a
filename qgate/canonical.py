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


def canonical_json(obj: Any) -> str:
    return json.dumps(json_safe(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(obj: Any) -> str:
    """sha256 hex digest of the canonical JSON of ``obj`` (key order and tuples do not matter)."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()
