"""benchmarks/plain_decode.py runs on CPU (tiny model) and reports both arms; its timings are not checked, what
the arms decode is."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def test_plain_decode_reports_both_arms(capsys):
    from benchmarks import plain_decode

    records = plain_decode.main(["--tiny", "--context", "512", "--new-tokens", "4", "--budget", "64",
                                 "--device", "cpu", "--profile-step"])
    assert [r["arm"] for r in records] == ["full-sdpa", "catekv"]
    assert all(r["ms_per_step"] > 0 and r["layers"] == 2 for r in records)
    assert "Self CPU time total" in capsys.readouterr().out  # one decode step's profile


def test_both_arms_decode_what_generate_decodes():
    """With a budget above the context nothing is evicted: the CateKV arm decodes full attention's tokens
    (both from ``generate``), and with a small budget it decodes as many."""
    from benchmarks import plain_decode

    kept = plain_decode.main(["--tiny", "--context", "256", "--new-tokens", "4", "--budget", "1024", "--device", "cpu"])
    assert kept[0]["tokens"] == kept[1]["tokens"] and len(kept[0]["tokens"]) == 4
    evicting = plain_decode.main(["--tiny", "--context", "256", "--new-tokens", "4", "--budget", "64",
                                  "--device", "cpu"])
    assert [len(r["tokens"]) for r in evicting] == [4, 4]
