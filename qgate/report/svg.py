"""Inline SVG charts for the report, written by hand so the HTML needs no plotting library and no script.

Every function returns `markupsafe.Markup` holding one <svg> element. Any text that reaches the SVG
(task names, layer names, formats) goes through `escape`, because it may come from a model or a dataset.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

from markupsafe import Markup, escape

# One palette for the whole report (also used by the CSS): verdicts and series.
VERDICT_COLOURS = {"pass": "#1a7f37", "fail": "#cf222e", "inconclusive": "#9a6700"}
SERIES_COLOURS = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bc4c00", "#1b7c83", "#6e7781", "#bf3989"]
FONT = "font-family=\"system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif\""


def _num(value: float) -> str:
    """A coordinate with two decimals: short SVG, and identical output for identical input."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}g}"


def _signed(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:+.{digits}g}".replace("-", "−")


def _svg(width: float, height: float, body: Iterable[str], label: str) -> Markup:
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{_num(width)}" '
            f'height="{_num(height)}" viewBox="0 0 {_num(width)} {_num(height)}" {FONT} font-size="12">'
            f"<title>{escape(label)}</title>")
    return Markup(head + "".join(body) + "</svg>")


def _text(x: float, y: float, content: object, anchor: str = "start", extra: str = "") -> str:
    return (f'<text x="{_num(x)}" y="{_num(y)}" text-anchor="{anchor}"{(" " + extra) if extra else ""}>'
            f"{escape(str(content))}</text>")


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (1, 2, 5 x 10^k steps)."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    raw = (high - low) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks, value = [], first
    while value <= high + 1e-9 * step:
        ticks.append(0.0 if abs(value) < step * 1e-9 else value)
        value += step
    return ticks


def delta_chart(rows: Sequence[dict], *, label: str = "Delta with confidence interval against the threshold") -> Markup:
    """A forest plot: one line per member x format x task, the delta as a dot, its CI as a whisker,
    zero as a grey line and the allowed drop (threshold) as a dashed red line on that line's own scale.

    Each row needs: title (str), delta, ci_low, ci_high (floats or None), threshold (the signed delta
    at which the task fails, or None), verdict, unit (e.g. "pts").
    Rows keep their own x scale because tasks differ in units (accuracy points vs perplexity).
    """
    label_w, plot_w, value_w, row_h, top = 260.0, 420.0, 190.0, 30.0, 26.0
    width = label_w + plot_w + value_w
    height = top + row_h * max(len(rows), 1) + 16
    body = [_text(label_w, 16, "worse ◀", "start", 'fill="#57606a"'),
            _text(label_w + plot_w, 16, "▶ better", "end", 'fill="#57606a"')]
    if not rows:
        body.append(_text(width / 2, top + 18, "no comparisons in this run", "middle", 'fill="#57606a"'))
    for index, row in enumerate(rows):
        y = top + index * row_h + row_h / 2
        points = [v for v in (row.get("delta"), row.get("ci_low"), row.get("ci_high"), row.get("threshold"), 0.0)
                  if v is not None and math.isfinite(v)]
        low, high = min(points), max(points)
        span = (high - low) or 1.0
        low, high = low - 0.12 * span, high + 0.12 * span
        # Lower-is-better metrics (perplexity) fail upwards: mirror them so "worse" is always on the left.
        flip = not row.get("higher_is_better", True)

        def x_of(value: float) -> float:
            share = (value - low) / (high - low)
            return label_w + plot_w * ((1 - share) if flip else share)

        if index % 2 == 0:
            body.append(f'<rect x="0" y="{_num(y - row_h / 2)}" width="{_num(width)}" height="{_num(row_h)}" fill="#f6f8fa"/>')
        body.append(_text(8, y + 4, row.get("title", ""), "start"))
        body.append(f'<line x1="{_num(label_w)}" x2="{_num(label_w + plot_w)}" y1="{_num(y)}" y2="{_num(y)}" stroke="#d0d7de"/>')
        body.append(f'<line x1="{_num(x_of(0.0))}" x2="{_num(x_of(0.0))}" y1="{_num(y - 11)}" y2="{_num(y + 11)}" stroke="#6e7781"/>')
        threshold = row.get("threshold")
        if threshold is not None and math.isfinite(threshold):
            tx = x_of(threshold)
            body.append(f'<line class="threshold" x1="{_num(tx)}" x2="{_num(tx)}" y1="{_num(y - 13)}" y2="{_num(y + 13)}" '
                        f'stroke="#cf222e" stroke-width="2" stroke-dasharray="4 3"/>')
        colour = VERDICT_COLOURS.get(row.get("verdict", ""), "#57606a")
        ci_low, ci_high, delta = row.get("ci_low"), row.get("ci_high"), row.get("delta")
        if ci_low is not None and ci_high is not None:
            a, b = x_of(ci_low), x_of(ci_high)
            body.append(f'<line class="whisker" x1="{_num(a)}" x2="{_num(b)}" y1="{_num(y)}" y2="{_num(y)}" stroke="{colour}" stroke-width="2.5"/>')
            for end in (a, b):
                body.append(f'<line x1="{_num(end)}" x2="{_num(end)}" y1="{_num(y - 6)}" y2="{_num(y + 6)}" stroke="{colour}" stroke-width="2"/>')
        if delta is not None and math.isfinite(delta):
            body.append(f'<circle class="delta" cx="{_num(x_of(delta))}" cy="{_num(y)}" r="5" fill="{colour}"/>')
        unit = row.get("unit") or ""
        interval = f"[{_signed(ci_low)}, {_signed(ci_high)}]" if ci_low is not None and ci_high is not None else ""
        body.append(_text(label_w + plot_w + 10, y + 4, f"{_signed(delta)} {unit} {interval}".strip(), "start",
                          f'fill="{colour}"'))
    legend_y = height - 4
    body.append(_text(label_w, legend_y, "● delta   ─ confidence interval   ┆ allowed (threshold, red dashed)   │ zero (grey)",
                      "start", 'fill="#57606a" font-size="11"'))
    return _svg(width, height + 6, body, label)


def _heat_colour(value: float | None) -> str:
    """0 -> red, 0.5 -> amber, 1 -> green; missing -> light grey."""
    if value is None or not math.isfinite(value):
        return "#eaeef2"
    v = min(max(value, 0.0), 1.0)
    stops = [(0.0, (207, 34, 46)), (0.5, (212, 167, 44)), (1.0, (26, 127, 55))]
    for (p0, c0), (p1, c1) in zip(stops, stops[1:]):
        if v <= p1:
            t = (v - p0) / (p1 - p0)
            r, g, b = (round(a + (b_ - a) * t) for a, b_ in zip(c0, c1))
            return f"#{r:02x}{g:02x}{b:02x}"
    return "#1a7f37"


def heatmap(lengths: Sequence, depths: Sequence, cells: Sequence[Sequence[float | None]], *, title: str,
            label: str | None = None) -> Markup:
    """Needle retrieval accuracy: context length across, needle depth down; cells[d][l] in [0, 1]."""
    cell_w, cell_h, left, top = 58.0, 26.0, 64.0, 40.0
    width = max(left + cell_w * max(len(lengths), 1) + 10, 230.0)  # room for the axis title
    height = top + cell_h * max(len(depths), 1) + 34
    body = [_text(left, 16, title, "start", 'font-weight="600"'),
            _text(left + cell_w * len(lengths) / 2, height - 6, "context length (tokens)", "middle", 'fill="#57606a"'),
            _text(4, 32, "depth", "start", 'fill="#57606a"')]
    for li, length in enumerate(lengths):
        body.append(_text(left + li * cell_w + cell_w / 2, top + cell_h * len(depths) + 14, length, "middle"))
    for di, depth in enumerate(depths):
        y = top + di * cell_h
        depth_label = f"{depth:g}%" if isinstance(depth, (int, float)) else str(depth)
        body.append(_text(left - 6, y + cell_h / 2 + 4, depth_label, "end"))
        for li in range(len(lengths)):
            value = cells[di][li] if di < len(cells) and li < len(cells[di]) else None
            x = left + li * cell_w
            body.append(f'<rect class="cell" x="{_num(x)}" y="{_num(y)}" width="{_num(cell_w - 2)}" height="{_num(cell_h - 2)}" '
                        f'fill="{_heat_colour(value)}"><title>{escape(f"length {lengths[li]}, depth {depth_label}: {_fmt(value)}")}</title></rect>')
            text = "–" if value is None else f"{value:.2f}"
            body.append(_text(x + cell_w / 2 - 1, y + cell_h / 2 + 4, text, "middle",
                              'fill="#ffffff" font-weight="600"' if value is not None else 'fill="#57606a"'))
    return _svg(width, height, body, label or title)


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The decoder block a tensor belongs to ("model.layers.12.mlp.up_proj" -> 12), None outside the blocks."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def tensor_kind(name: str) -> str:
    """The role of a tensor inside its block ("...self_attn.v_proj.weight" -> "v_proj")."""
    parts = [p for p in name.split(".") if p not in ("weight", "bias")]
    return parts[-1] if parts else name


def sqnr_chart(tensors: Sequence[dict], *, title: str, label: str | None = None) -> Markup:
    """SQNR in dB per decoder layer, one coloured series per tensor kind (q_proj, v_proj, down_proj...).

    tensors: dicts with name and sqnr_db. Tensors outside the decoder blocks (embeddings, lm_head)
    are listed under the chart by the template, not plotted here.
    """
    series: dict[str, list[tuple[int, float]]] = {}
    for tensor in tensors:
        layer, sqnr = layer_index(tensor.get("name", "")), tensor.get("sqnr_db")
        if layer is None or sqnr is None or not math.isfinite(sqnr):
            continue
        series.setdefault(tensor_kind(tensor["name"]), []).append((layer, float(sqnr)))
    left, top, plot_w, plot_h, legend_w = 52.0, 30.0, 560.0, 200.0, 130.0
    width, height = left + plot_w + legend_w, top + plot_h + 44
    body = [_text(left, 16, title, "start", 'font-weight="600"')]
    if not series:
        body.append(_text(left + plot_w / 2, top + plot_h / 2, "no per-layer statistics recorded", "middle", 'fill="#57606a"'))
        return _svg(width, height, body, label or title)
    layers = [layer for points in series.values() for layer, _ in points]
    values = [value for points in series.values() for _, value in points]
    first, last = min(layers), max(layers)
    ticks = nice_ticks(math.floor(min(values) - 1), math.ceil(max(values) + 1), 5)
    low, high = min(ticks[0], min(values)), max(ticks[-1], max(values))
    high = high if high > low else low + 1

    def x_of(layer: float) -> float:
        return left + (plot_w * (layer - first) / (last - first) if last > first else plot_w / 2)

    def y_of(value: float) -> float:
        return top + plot_h * (1 - (value - low) / (high - low))

    for tick in ticks:
        body.append(f'<line x1="{_num(left)}" x2="{_num(left + plot_w)}" y1="{_num(y_of(tick))}" y2="{_num(y_of(tick))}" stroke="#eaeef2"/>')
        body.append(_text(left - 6, y_of(tick) + 4, f"{tick:g}", "end", 'fill="#57606a"'))
    for layer in nice_ticks(first, last, min(10, max(last - first, 1))):
        if float(layer).is_integer():
            body.append(_text(x_of(layer), top + plot_h + 16, int(layer), "middle", 'fill="#57606a"'))
    body.append(_text(left + plot_w / 2, top + plot_h + 34, "decoder layer", "middle", 'fill="#57606a"'))
    body.append(_text(14, top + plot_h / 2, "SQNR dB", "middle", f'fill="#57606a" transform="rotate(-90 14 {_num(top + plot_h / 2)})"'))
    for index, (kind, points) in enumerate(sorted(series.items())):
        colour = SERIES_COLOURS[index % len(SERIES_COLOURS)]
        points.sort()
        path = " ".join(f"{_num(x_of(layer))},{_num(y_of(value))}" for layer, value in points)
        body.append(f'<polyline class="series" points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        for layer, value in points:
            body.append(f'<circle cx="{_num(x_of(layer))}" cy="{_num(y_of(value))}" r="2.5" fill="{colour}">'
                        f"<title>{escape(f'layer {layer} {kind}: {value:.1f} dB')}</title></circle>")
        ly = top + 10 + index * 18
        body.append(f'<rect x="{_num(left + plot_w + 14)}" y="{_num(ly - 9)}" width="12" height="12" fill="{colour}"/>')
        body.append(_text(left + plot_w + 32, ly + 1, kind, "start"))
    return _svg(width, height, body, label or title)


def _bytes_label(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def footprint_bars(rows: Sequence[dict], *, title: str, label: str | None = None) -> Markup:
    """Horizontal bars: weight bytes per format (rows: format, bytes, bits_per_value), bf16 first."""
    left, top, plot_w, bar_h, gap = 120.0, 30.0, 440.0, 20.0, 8.0
    width = left + plot_w + 170
    height = top + (bar_h + gap) * max(len(rows), 1) + 10
    body = [_text(left, 16, title, "start", 'font-weight="600"')]
    largest = max((r.get("bytes") or 0 for r in rows), default=0) or 1
    for index, row in enumerate(rows):
        y = top + index * (bar_h + gap)
        size = row.get("bytes") or 0
        w = plot_w * size / largest
        colour = SERIES_COLOURS[index % len(SERIES_COLOURS)]
        body.append(_text(left - 8, y + bar_h / 2 + 4, row.get("format", ""), "end"))
        body.append(f'<rect class="bar" x="{_num(left)}" y="{_num(y)}" width="{_num(max(w, 1))}" height="{_num(bar_h)}" fill="{colour}"/>')
        bits = row.get("bits_per_value")
        note = _bytes_label(size) + (f" · {bits:.3g} bits/value" if bits else "")
        body.append(_text(left + max(w, 1) + 6, y + bar_h / 2 + 4, note, "start"))
    return _svg(width, height, body, label or title)
