"""Tests of catekv_profiler.report: summary, text, sample agreement and plot, on synthetic profiles."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from catekv_profiler.report import format_summary, plot_profile, sample_agreement, summarize
from catekv_runtime.profile import ModelSpec, Profile, ProfileParams, ReferenceSpec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_profile(cv: torch.Tensor | list, r: float = 0.5, **params: object) -> Profile:
    """A profile from per-sample CVs ``[S, L, H]``; the other statistics do not matter to the report."""
    cv = torch.as_tensor(cv, dtype=torch.float32)
    samples, layers, heads = cv.shape
    return Profile.from_statistics(
        cv,
        torch.full_like(cv, 1e-3),
        torch.ones_like(cv),
        ProfileParams.for_budget(512, adaptive_ratio=r, **params),
        ModelSpec("org/tiny-model", "abc123", "LlamaForCausalLM", layers, heads, 3 * heads, 64),
        ReferenceSpec("variable_tracking", 8192, samples, 7, "f00dfeed" * 8),
        provenance={"tool": "catekv_profiler 0.1.0", "device": "cuda:0", "dtype": "bfloat16", "note": "extra"},
    )


# Two samples, 2 layers x 2 heads, r = 0.5: two lowest-CV heads per sample.
# Sample 0 picks flat heads {0, 1}, sample 1 picks {0, 2}. Quantile-0.5 votes: [2, 1, 1, 0]; the final map
# takes head 0 (2 votes), then head 1 (tie with head 2 at 1 vote and equal mean CV 0.55: lower index wins).
TINY = [[[0.1, 0.2], [0.9, 0.8]], [[0.1, 0.9], [0.2, 0.8]]]


def test_agreement_tiny_case_by_hand() -> None:
    profile = make_profile(TINY)
    assert profile.votes.flatten().tolist() == [2, 1, 1, 0]
    assert profile.head_map.flatten().tolist() == [True, True, False, False]

    agree = sample_agreement(profile)
    assert agree["applicable"] and agree["num_samples"] == 2 and agree["heads_per_sample"] == 2
    assert agree["jaccard_mean"] == pytest.approx(1 / 3)  # {0,1} vs {0,2}: 1 shared of 3
    assert agree["jaccard_min"] == pytest.approx(1 / 3)
    assert agree["jaccard_with_head_map_mean"] == pytest.approx((1 + 1 / 3) / 2)
    assert agree["jaccard_with_head_map_min"] == pytest.approx(1 / 3)
    assert agree["unanimous_fraction"] == pytest.approx(0.5)  # heads 0 (2 votes) and 3 (0 votes)
    # Ranks [0,1,3,2] vs [0,3,1,2]: sum d^2 = 8, rho = 1 - 6 * 8 / (4 * 15) = 0.2.
    assert agree["rank_correlation_mean"] == pytest.approx(0.2)


def test_agreement_three_samples_mean_and_min() -> None:
    cv = [[[0.1, 0.2], [0.9, 0.8]], [[0.1, 0.9], [0.2, 0.8]], [[0.1, 0.2], [0.9, 0.8]]]  # sets {0,1},{0,2},{0,1}
    agree = sample_agreement(make_profile(cv))
    assert agree["jaccard_mean"] == pytest.approx((1 / 3 + 1 + 1 / 3) / 3)
    assert agree["jaccard_min"] == pytest.approx(1 / 3)
    assert agree["rank_correlation_mean"] == pytest.approx((0.2 + 1.0 + 0.2) / 3)


def test_identical_samples_agree_fully() -> None:
    one = torch.rand(3, 4, generator=torch.Generator().manual_seed(0))
    agree = sample_agreement(make_profile(one.expand(5, 3, 4), r=0.4))
    assert agree["jaccard_mean"] == 1.0 and agree["jaccard_min"] == 1.0
    assert agree["jaccard_with_head_map_mean"] == 1.0
    assert agree["unanimous_fraction"] == 1.0
    assert agree["rank_correlation_mean"] == pytest.approx(1.0)


def test_tied_cvs_use_average_ranks_and_flat_index_order() -> None:
    # Sample 0 ranks with the tie shared: [0.5, 0.5, 2, 3]; sample 1: [0, 1, 2, 3].
    # Centred: [-1, -1, .5, 1.5] and [-1.5, -.5, .5, 1.5]: rho = 4.5 / sqrt(4.5 * 5).
    agree = sample_agreement(make_profile([[[1.0, 1.0], [2.0, 3.0]], [[1.0, 2.0], [3.0, 4.0]]], r=0.25))
    assert agree["rank_correlation_mean"] == pytest.approx(4.5 / math.sqrt(22.5))
    # One head per sample; the tie in sample 0 goes to flat index 0, which sample 1 also picks.
    assert agree["jaccard_mean"] == 1.0


def test_constant_cvs_make_rank_correlation_undefined() -> None:
    agree = sample_agreement(make_profile([[[1.0, 1.0], [1.0, 1.0]], [[1.0, 2.0], [3.0, 4.0]]]))
    assert agree["rank_correlation_mean"] is None
    assert agree["jaccard_mean"] is not None


@pytest.mark.parametrize("r", [0.0, 1.0])
def test_extreme_ratios_define_jaccard(r: float) -> None:
    # r = 0: every set is empty (empty vs empty counts as 1.0); r = 1: every set is full.
    agree = sample_agreement(make_profile(TINY, r=r))
    assert agree["heads_per_sample"] == (0 if r == 0 else 4)
    assert agree["jaccard_mean"] == 1.0 and agree["jaccard_min"] == 1.0
    assert agree["jaccard_with_head_map_mean"] == 1.0


def test_one_sample_agreement_is_not_applicable() -> None:
    profile = make_profile([[[0.1, 0.2], [0.9, 0.8]]])
    agree = sample_agreement(profile)
    assert agree["applicable"] is False and agree["num_samples"] == 1
    for key in ("jaccard_mean", "jaccard_min", "jaccard_with_head_map_mean", "unanimous_fraction"):
        assert agree[key] is None
    assert agree["rank_correlation_mean"] is None
    assert "Sample agreement: n/a (1 sample" in format_summary(summarize(profile))


def random_profile(samples: int = 6, layers: int = 5, heads: int = 3, r: float = 0.4) -> Profile:
    g = torch.Generator().manual_seed(1)
    base = 3 * torch.rand(layers, heads, generator=g)
    return make_profile(base + 0.5 * torch.rand(samples, layers, heads, generator=g), r=r)


def test_summary_matches_profile() -> None:
    profile = random_profile()
    lengths = (100, 512, 4096, 131072)  # 100 and 512 are at or below the budget: kv_kept_fraction handles them
    summary = summarize(profile, lengths)
    assert json.loads(json.dumps(summary)) == summary  # JSON-serialisable, no tuples or tensors

    heads = summary["adaptive_heads"]
    assert heads["total"] == int(profile.head_map.sum()) == math.ceil(0.4 * 15)
    assert heads["num_heads"] == 15
    assert heads["fraction"] == pytest.approx(profile.adaptive_fraction)
    for layer, row in enumerate(heads["per_layer"]):
        assert row["layer"] == layer
        assert row["heads"] == [h for h in range(3) if profile.head_map[layer, h]]
        assert row["count"] == len(row["heads"])
    assert summary["budgets"]["adaptive_heads"] == heads["total"]
    assert summary["budgets"]["consistent_heads"] == 15 - heads["total"]
    assert summary["budgets"]["consistent_tokens"] == [512]

    assert [row["context_length"] for row in summary["kv_kept"]] == list(lengths)
    for row in summary["kv_kept"]:
        assert row["fraction"] == profile.kv_kept_fraction(row["context_length"])
    assert summary["kv_kept"][0]["fraction"] == 1.0

    assert summary["model"]["id"] == "org/tiny-model" and summary["model"]["num_kv_heads"] == 3
    assert summary["parameters"] == {
        "k": 0.99, "alpha": 1.0, "r": 0.4, "eta": 1.0, "budget": 512,
        "chunk": 8, "L_obs": 64, "L_init": 16, "L_rec": 64, "reserve": 32, "tie_rule": "exact",
    }  # fmt: skip
    assert summary["reference"]["num_samples"] == 6 and summary["reference"]["seed"] == 7
    # Standard provenance keys are always there (None when unrecorded); extra keys are kept.
    assert summary["provenance"]["created"] is None and summary["provenance"]["device"] == "cuda:0"
    assert summary["provenance"]["note"] == "extra"
    assert summary["agreement"] == sample_agreement(profile)


def test_format_summary_shows_key_figures() -> None:
    profile = random_profile()
    summary = summarize(profile)
    text = format_summary(summary)
    assert format_summary(json.loads(json.dumps(summary))) == text  # works on a JSON round trip too
    total = int(profile.head_map.sum())
    for expected in (
        "org/tiny-model",
        "5 layers x 3 KV heads",
        "r=0.4",
        "budget=512",
        "variable_tracking",
        "6 samples",
        "bfloat16",
        f"Adaptive heads: {total} of 15 ({total / 15:.1%})",
        f"{15 - total} consistent heads keep 512 tokens",
        "131,072 tokens",
        f"{profile.kv_kept_fraction(131072):.1%}",
        f"mean {summary['agreement']['jaccard_mean']:.3f}",
        f"{summary['agreement']['unanimous_fraction']:.1%}",
    ):
        assert expected in text, expected
    assert len([line for line in text.splitlines() if line.strip().startswith("layer ")]) == 5


def test_plot_writes_png_atomically(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "plots" / "profile.png"
    out.parent.mkdir()
    out.write_bytes(b"old")  # replaced, not appended to
    assert plot_profile(random_profile(), out) == out
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert [p.name for p in out.parent.iterdir()] == ["profile.png"]  # no temporary file left behind

    single = plot_profile(make_profile([[[0.1, 0.2], [0.9, 0.8]]]), tmp_path / "one.png")  # one sample works too
    assert single.read_bytes().startswith(PNG_SIGNATURE)


def test_plot_failure_leaves_no_temp_file(tmp_path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_profile(random_profile(), tmp_path / "profile.png")
    assert list(tmp_path.iterdir()) == []


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch) -> None:
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "catekv\[plot\]"'):
        plot_profile(random_profile(), tmp_path / "profile.png")
    assert list(tmp_path.iterdir()) == []
