"""The one atomic writer and the one Markdown table builder (catekv_runtime.files)."""

from __future__ import annotations

import stat

import pytest

from catekv_runtime.files import markdown_table, replacing, write_atomically


def test_write_atomically_replaces_whole_files(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_atomically(target, "old")
    write_atomically(target, b"new bytes")
    assert target.read_bytes() == b"new bytes" and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "out.md"
    write_atomically(target, "old")
    with pytest.raises(RuntimeError), replacing(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.md"]


def test_markdown_table():
    assert markdown_table(["a", "b"], [[1, "x"], ["y", 2.5]]) == ["| a | b |", "|---|---|", "| 1 | x |", "| y | 2.5 |"]
    assert markdown_table(["h"], [["a|b"]], cell=lambda v: str(v).replace("|", "\\|"))[-1] == "| a\\|b |"
