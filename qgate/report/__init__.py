"""The HTML sign-off report: collect a run from the store (data.py), draw its charts (svg.py) and
render one self-contained file (render.py) that embeds what a sign-off covers (payload.py).
qgate.signoff builds on this package; nothing here imports it."""

from qgate.report.data import collect
from qgate.report.render import render_html, render_run

__all__ = ["collect", "render_html", "render_run"]
