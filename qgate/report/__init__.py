"""The HTML sign-off report: collect a run from the store (data.py), draw its charts (svg.py) and
render one self-contained file (render.py) that embeds what a sign-off covers (payload.py).
qgate.signoff builds on this package; nothing here imports it."""
