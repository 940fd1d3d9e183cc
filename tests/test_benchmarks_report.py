"""benchmarks/report.py: docs/benchmarks.md is hand-written prose around the tables the report fills in."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402


def test_the_committed_page_is_what_its_command_writes():
    """Every table of docs/benchmarks.md is what ``python benchmarks/report.py`` makes of the committed results (so
    the page stays true to them, and the command keeps working when files move)."""
    page = report.PAGE.read_text()
    assert report.render(page) == page


def test_the_report_changes_only_the_generated_blocks():
    """Prose is the page's own: a block's stale table is replaced, the text around it kept as written."""
    page = "Hand-written.\n\n<!-- generated: kernel -->\n| stale |\n<!-- end generated -->\n\nMore prose.\n"
    others = "".join(f"<!-- generated: {name} -->\n<!-- end generated -->\n" for name in report.TABLES
                     if name != "kernel")
    out = report.render(page + others)
    assert out.startswith("Hand-written.\n\n<!-- generated: kernel -->\n| context | batch | Triton GB/s |")
    assert "| stale |" not in out and "\n<!-- end generated -->\n\nMore prose.\n" in out


def test_a_block_without_a_table_or_a_table_without_a_block_is_refused():
    with pytest.raises(SystemExit, match="nonsense"):
        report.render("<!-- generated: nonsense -->\n<!-- end generated -->\n")
    with pytest.raises(SystemExit, match="targets"):
        report.render("no blocks at all\n")
