"""Turn a report model (see data.py) into one self-contained HTML file: inline CSS and SVG, no script.

The sign-off lives in three marked regions (<!--qgate:signoff:NAME--> ... <!--/qgate:signoff:NAME-->).
Emptying them gives the report content that a sign-off digest covers, so a report rendered before and
after a sign-off has the same content digest.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from functools import lru_cache
from pathlib import Path

import jinja2
from markupsafe import Markup

from qgate.files import write_atomic
from qgate.report import svg
from qgate.report.data import OUTCOME_TITLES, collect
from qgate.report.payload import payload_if_signed

TEMPLATES = Path(__file__).parent / "templates"
SIGNOFF_PARTS = ("meta", "note", "block")
_REGION = re.compile(r"<!--qgate:signoff:(meta|note|block)-->(.*?)<!--/qgate:signoff:\1-->", re.S)
MAX_SQNR_WORST = 5


# ---------------------------------------------------------------- filters

def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt_num(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if not _finite(value):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}"


def fmt_signed(value, digits: int = 3) -> str:
    if not _finite(value):
        return fmt_num(value)
    text = f"{value:+.{digits}g}"
    return text.replace("-", "−")


def fmt_percent(value) -> str:
    return f"{value * 100:.3g}%" if _finite(value) else "–"


def fmt_bytes(value) -> str:
    if not _finite(value):
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.4g} {unit}"
    return f"{value:.0f} B"


def fmt_count(value) -> str:
    if not _finite(value):
        return "–"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.4g} {unit}"
    return f"{value:g}"


def fmt_when(value) -> str:
    """ISO timestamps as "2025-01-31 14:02:07 UTC" (the stored text stays exact)."""
    if not value:
        return "–"
    text = str(value)
    match = re.match(r"(\d{4}-\d\d-\d\d)[T ](\d\d:\d\d:\d\d)(?:\.\d+)?(Z|[+-]00:00)?$", text)
    if not match:
        return text
    return f"{match.group(1)} {match.group(2)}" + (" UTC" if match.group(3) else "")


def clip(value, length: int = 60) -> str:
    """One line of at most ``length`` characters (a preview; the full text is one click away)."""
    text = " ".join(str(value or "").split())
    return text if len(text) <= length else text[:length - 1] + "…"


def fmt_rate(value) -> str:
    """Large rates as grouped integers (12,454), small ones with three significant digits."""
    if not _finite(value):
        return "–"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    # autoescape everywhere: prompts, outputs and targets come from models and datasets.
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             trim_blocks=False, lstrip_blocks=False, keep_trailing_newline=True)
    env.filters.update(num=fmt_num, signed=fmt_signed, percent=fmt_percent, bytes=fmt_bytes, count=fmt_count,
                       when=fmt_when, rate=fmt_rate, clip=clip,
                       tojson_pretty=lambda v: json.dumps(v, indent=2, sort_keys=True, default=str))
    return env


# ---------------------------------------------------------------- view (model -> what the template shows)

def _delta_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        rows.append({**r, "title": f"{r.get('member', '')} · {r.get('format', '')} · {r.get('task', '')}"})
    return rows


def _needle_charts(needle: list[dict]) -> list[dict]:
    """One row per member and task: the baseline grid once, then each format's candidate grid."""
    rows: dict[tuple, dict] = {}
    for entry in needle:
        key = (entry.get("member"), entry.get("task", "needle"))
        row = rows.setdefault(key, {"member": key[0], "task": key[1], "charts": []})
        grid = entry.get("baseline") or {}
        if not row["charts"] and grid:
            row["charts"].append(svg.heatmap(grid.get("lengths", []), grid.get("depths", []), grid.get("cells", []),
                                             title="baseline (bf16)", label=f"needle retrieval, {key[0]} baseline"))
        grid = entry.get("candidate") or {}
        title = f"candidate ({entry.get('format')})"
        row["charts"].append(svg.heatmap(grid.get("lengths", []), grid.get("depths", []), grid.get("cells", []),
                                         title=title, label=f"needle retrieval, {key[0]} {title}"))
    return list(rows.values())


# What the quantization summary shows, in this order (other keys stay in the config/JSON views).
SUMMARY_KEYS = {
    "sqnr_db": "aggregate SQNR", "rel_mse": "relative MSE", "promoted_blocks": "promoted blocks",
    "promoted_share": "promoted share", "saturated_block_share": "saturated blocks", "tensors": "quantized tensors",
    "kept_tensors": "kept in full precision", "quantized_params": "quantized values", "quantized_bytes": "model bytes",
    "bf16_bytes": "bf16 bytes", "footprint_ratio": "vs bf16", "seconds": "quantization time (s)",
}


def _summary_items(summary: dict) -> list[tuple[str, str]]:
    items = []
    for key, title in SUMMARY_KEYS.items():
        value = summary.get(key)
        if key == "sqnr_db" and value is None and summary.get("non_finite_tensors"):
            items.append((title, "NaN (non-finite weights)"))
            continue
        if value is None:
            continue
        if "bytes" in key:
            text = fmt_bytes(value)
        elif key in ("quantized_params", "blocks", "promoted_blocks"):
            text = fmt_count(value)
            if key == "promoted_blocks" and _finite(summary.get("blocks")):
                text += f" of {fmt_count(summary['blocks'])}"
        elif "share" in key or "ratio" in key:
            text = fmt_percent(value)
        elif key == "sqnr_db":
            text = f"{value:.3g} dB" if _finite(value) else str(value)
        else:
            text = fmt_num(value)
        items.append((title, text))
    if summary.get("non_finite_tensors"):
        items.append(("non-finite tensors", ", ".join(map(str, summary["non_finite_tensors"]))))
    if summary.get("scheme"):  # a checkpoint candidate: its scheme and how closely qgate emulates it
        items.append(("scheme", str(summary["scheme"])))
        items.append(("checkpoint", f"{summary.get('path')} ({summary.get('checkpoint')})"))
        fid = summary.get("fidelity") or {}
        if fid.get("tensors"):
            items.append(("emulation fidelity",
                          f"{fmt_percent(fid['identical_share'])} of elements identical to qgate's "
                          f"{summary.get('qgate_format')} over {fid['tensors']} tensors "
                          f"({fid.get('identical_tensors')} entirely); max rel. diff {fmt_num(fid['max_rel_diff'])}, "
                          f"mean {fmt_num(fid['mean_rel_diff'])}"))
        elif not summary.get("qgate_format"):
            items.append(("emulation fidelity", "not a format qgate emulates"))
    untied = summary.get("untied")
    if untied:
        items.append(("untied", "; ".join(" / ".join(map(str, pair)) for pair in untied)))
    return items


def _quantization_view(entries: list[dict]) -> list[dict]:
    view = []
    for q in entries:
        tensors = q.get("tensors") or []
        outside = [t for t in tensors if svg.layer_index(t.get("name", "")) is None]
        measured = [t for t in tensors if _finite(t.get("sqnr_db"))]
        worst = sorted(measured, key=lambda t: t["sqnr_db"])[:MAX_SQNR_WORST]
        view.append({**q, "tensors": tensors, "outside_layers": outside, "worst": worst,
                     "summary_items": _summary_items(q.get("summary") or {}),
                     "sqnr_chart": svg.sqnr_chart(tensors, title=f"SQNR per layer · {q.get('member')} · {q.get('format')}")})
    return view


def _footprint_view(footprint: dict) -> tuple[dict, list[Markup]]:
    rows = [dict(r) for r in footprint.get("rows", [])]
    base = {r.get("member"): r.get("bytes") for r in rows if r.get("format") == "bf16"}
    for r in rows:
        b = base.get(r.get("member"))
        r["ratio"] = (r["bytes"] / b) if _finite(r.get("bytes")) and _finite(b) and b else None
    charts = []
    for member in dict.fromkeys(r.get("member") for r in rows):
        charts.append(svg.footprint_bars([r for r in rows if r.get("member") == member],
                                         title=f"weight bytes per format · {member}"))
    return {**footprint, "rows": rows}, charts


def signoff_region_markup(model: dict) -> dict[str, Markup]:
    signoffs = model.get("signoffs") or []
    latest = signoffs[-1] if signoffs else None
    template = environment().get_template("signoff.html.j2")
    regions = {}
    for part in SIGNOFF_PARTS:
        inner = template.render(part=part, run_id=model["run"].get("id"), signoffs=signoffs, latest=latest,
                                signed_payload=model.get("signed_payload"))
        regions[part] = Markup(f"<!--qgate:signoff:{part}-->{inner}<!--/qgate:signoff:{part}-->")
    return regions


def render_html(model: dict) -> str:
    """The whole report as one HTML string."""
    footprint, footprint_charts = _footprint_view(model.get("footprint") or {})
    regions = signoff_region_markup(model)
    context = {
        **model,
        "footprint": footprint,
        "quantization": _quantization_view(model.get("quantization") or []),
        "outcome_titles": OUTCOME_TITLES,
        "charts": {"deltas": svg.delta_chart(_delta_rows(model.get("results") or [])),
                   "needle": _needle_charts(model.get("needle") or []),
                   "footprint": footprint_charts},
        "signoff_meta": regions["meta"], "signoff_note": regions["note"], "signoff_block": regions["block"],
    }
    return environment().get_template("report.html.j2").render(**context)


# ---------------------------------------------------------------- sign-off regions in a rendered file

def signoff_regions(html: str) -> list[tuple[str, str]]:
    """The (name, content) of each sign-off region in document order."""
    return [(m.group(1), m.group(2)) for m in _REGION.finditer(html)]


def strip_signoff(html: str) -> str:
    """The report content a sign-off covers: the same HTML with the sign-off regions emptied."""
    return _REGION.sub(lambda m: f"<!--qgate:signoff:{m.group(1)}--><!--/qgate:signoff:{m.group(1)}-->", html)


def content_sha256(html: str) -> str:
    return hashlib.sha256(strip_signoff(html).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- files

def default_report_path(family: str, run_id) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{family}-{run_id}")
    return Path("reports") / f"{safe}.html"


REPORT_MODE = 0o644


def render_run(store, run_id, path=None) -> Path:
    """Collect the run from the store, render it (with its sign-offs, if any) and write the file."""
    model = collect(store, run_id)
    if model["signoffs"]:
        model["signed_payload"] = payload_if_signed(store, model["run"]["id"], content_sha256(render_html(model)),
                                                    model["signoffs"][-1]["digest"])
    target = Path(path) if path is not None else default_report_path(model["run"]["family"], model["run"]["id"])
    # 0644, unlike the database (0600): a reviewer, possibly another account or the web server that
    # serves CI artifacts, must open it; it holds only what the reviewer is meant to see (the database
    # URL redacted), and code the sandbox runs gains nothing from it (it is written after every evaluation)
    return write_atomic(target, render_html(model), mode=REPORT_MODE)
