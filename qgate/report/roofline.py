"""The memory/roofline rows of the report: weight bytes per member x format and the decode ceiling.

qgate.footprint computes them from the checkpoint's config (the same recipe plan `qgate quantize`
uses, bytes at each format's effective bits, a lookup-only embedding read one row per token). When
the checkpoint cannot be sized here (a config that is not available on this machine), the rows fall
back to the byte counts the quantization recorded, and the ceiling to bandwidth / weight bytes.
"""

from __future__ import annotations

import json
import math

from qgate.footprint import DEFAULT_BANDWIDTH

DEFAULT_BANDWIDTH_LABEL = "3.35 TB/s (one H100 SXM, HBM3)"


def _number(mapping: dict, *keys):
    for key in keys:
        value = mapping.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return value
    return None


def _recipe(value):
    """The recipe as the quantization stored it: a built-in name, or inline rules as JSON text."""
    if isinstance(value, str) and value.lstrip().startswith(("{", "[")):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value or "uniform"


def _measure(checkpoint: dict, fmt: str, recipe, bandwidth: float):
    """qgate.footprint for one member x format, or None when its config cannot be read here."""
    from qgate.errors import QgateError
    from qgate.footprint import footprint

    source = checkpoint.get("source")
    if not source:
        return None
    try:
        return footprint(source, fmt, recipe=_recipe(recipe), bandwidth=bandwidth, revision=checkpoint.get("revision"))
    except (QgateError, OSError, ValueError, KeyError):
        return None


def footprint_table(store, links: list[dict], quantization: list[dict], bandwidth: float = DEFAULT_BANDWIDTH,
                    label: str = DEFAULT_BANDWIDTH_LABEL) -> dict:
    checkpoints = {}
    for link in links:
        if link["member"] not in checkpoints and link.get("checkpoint_id"):
            checkpoints[link["member"]] = store.checkpoint(link["checkpoint_id"]) or {}
    rows, sources = [], set()
    for q in quantization:
        member, fmt = q.get("member"), q.get("format")
        measured = _measure(checkpoints.get(member, {}), fmt, q.get("recipe"), bandwidth)
        has_bf16 = any(r["member"] == member and r["format"] == "bf16" for r in rows)
        if measured is not None:
            sources.add("qgate.footprint from the checkpoint's config")
            if not has_bf16:
                rows.append(_row(member, "bf16", measured.params, measured.bf16_bytes,
                                 bandwidth / measured.bf16_bytes_per_token if measured.bf16_bytes_per_token else None,
                                 measured.bf16_bytes_per_token))
            rows.append(_row(member, fmt, measured.params, measured.total_bytes, measured.tokens_per_s,
                             measured.bytes_per_token))
            continue
        summary, tensors = q.get("summary") or {}, q.get("tensors") or []
        sources.add("bytes recorded by the quantization (whole model read per token)")
        params = _number(summary, "params") or (sum(t.get("numel") or 0 for t in tensors) or None)
        quant_bytes = _number(summary, "quantized_bytes") or (sum(t.get("bytes") or 0 for t in tensors) or None)
        base_bytes = _number(summary, "bf16_bytes") or (2 * params if params else None)
        if base_bytes and not has_bf16:
            rows.append(_row(member, "bf16", params, base_bytes, bandwidth / base_bytes, base_bytes))
        if quant_bytes:
            rows.append(_row(member, fmt, params, quant_bytes, bandwidth / quant_bytes, quant_bytes))
    return {"bandwidth": bandwidth, "bandwidth_label": label, "rows": rows, "source": "; ".join(sorted(sources))}


def _row(member, fmt, params, size, tokens_per_s, bytes_per_token) -> dict:
    return {"member": member, "format": fmt, "params": params, "bytes": size,
            "bits_per_value": 8 * size / params if params and size else None,
            "bytes_per_token": bytes_per_token, "tokens_per_s": tokens_per_s}
