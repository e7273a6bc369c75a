"""The markdown helpers shared by `qgate run` and `qgate policy diff`: table cells and the step summary."""

from __future__ import annotations

from qgate.summary import append_step_summary, markdown_cell


def test_markdown_cell_escapes_pipes_and_flattens_newlines():
    assert markdown_cell("a|b\nc") == "a\\|b c"
    assert markdown_cell(3.5) == "3.5" and markdown_cell(None) == "None"
    assert markdown_cell("gsm8k: −2.3 pts [−4.0, −0.6] exceeds 1.0") == "gsm8k: −2.3 pts [−4.0, −0.6] exceeds 1.0"


def test_append_step_summary_appends_only_when_the_variable_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    assert append_step_summary("# nothing\n") is False
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", "")
    assert append_step_summary("# nothing\n") is False
    path = tmp_path / "summary.md"
    path.write_text("earlier step\n", encoding="utf-8")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(path))
    assert append_step_summary("## qgate ✓\n") is True
    assert append_step_summary("more\n") is True
    assert path.read_text(encoding="utf-8") == "earlier step\n## qgate ✓\nmore\n"
