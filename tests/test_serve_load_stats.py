"""benchmarks/serve_load.py's figures of a level, from made-up request results (no server)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serve_load import level_stats  # noqa: E402


def result(start: float, ttft: float, gaps: list[float], tokens: int) -> dict:
    return {"start": start, "ttft": ttft, "gaps": gaps, "tokens": tokens, "end": start + ttft + sum(gaps)}


def test_the_ramp_leaves_out_the_requests_started_in_it():
    """Over a 10 s level, a 2 s ramp: the two requests started in it (one slow, as a burst's are) drop out of every
    figure, and the rates are over the 8 s after it; without a ramp everything counts over 10 s."""
    results = [result(0.0, 5.0, [1.0, 1.0], 3), result(1.0, 4.0, [1.0], 2),
               result(2.0, 0.5, [0.1, 0.1, 0.1], 4), result(6.0, 0.3, [0.2], 2), {"start": 7.0, "error": "HTTP 503"}]
    steady = level_stats(results, 0.0, 10.0, 2.0)
    assert (steady["requests"], steady["errors"], steady["first_error"]) == (2, 1, "HTTP 503")
    assert steady["wall_s"] == 8.0 and steady["output_tokens_per_s"] == 6 / 8 and steady["requests_per_s"] == 2 / 8
    assert (steady["ttft_p50_ms"], steady["ttft_p99_ms"]) == pytest.approx((400.0, 498.0))
    assert steady["itl_p99_ms"] == pytest.approx(197.0) and steady["ramp_s"] == 2.0
    everything = level_stats(results, 0.0, 10.0, 0.0)
    assert everything["requests"] == 4 and everything["output_tokens_per_s"] == 11 / 10
    assert everything["ttft_p99_ms"] == pytest.approx(4970.0)  # the burst's slow first tokens dominate the p99


@pytest.mark.parametrize("ramp", ["-1", "5"])
def test_a_ramp_outside_the_level_is_refused(ramp, capsys):
    from benchmarks import serve_load

    with pytest.raises(SystemExit):
        serve_load.main(["--port", "1", "--duration", "5", "--ramp", ramp])
    assert "--ramp must be >= 0 and shorter than --duration" in capsys.readouterr().err
