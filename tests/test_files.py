"""qgate.files.write_atomic: the whole new content or the old file, and no temporary file left behind."""

from __future__ import annotations

import os

import pytest

from qgate.files import write_atomic


def test_text_and_bytes_replace_the_whole_file_and_leave_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "report.html"  # the folder is created
    assert write_atomic(target, "a much longer first version — ü\n" * 10) == target
    write_atomic(target, "short ✓\n")
    assert target.read_bytes() == "short ✓\n".encode("utf-8")
    write_atomic(str(target), b"\x00bytes\n")
    assert target.read_bytes() == b"\x00bytes\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.html"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_file(tmp_path):
    target = tmp_path / "data.jsonl"
    target.write_text("old\n", encoding="utf-8")
    with pytest.raises(UnicodeEncodeError):
        write_atomic(target, "new \udcff half-written")  # fails while writing the temporary file
    assert target.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_a_failed_replace_removes_the_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "index.json"

    def refuse(src, dst):
        raise OSError("read-only")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="read-only"):
        write_atomic(target, "{}")
    assert list(tmp_path.iterdir()) == []
