"""benchmarks/plain_decode.py runs on CPU (tiny model) and reports both arms; its figures are not checked."""

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
