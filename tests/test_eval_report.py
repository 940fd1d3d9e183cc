"""docs/accuracy.md is built from catekv-eval's JSON: merged runs, averages, the target check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from catekv_eval import report
from catekv_eval.report import averages, largest_losses, load_runs, render, target_lines

ROOT = Path(__file__).resolve().parents[1]


def record(task, method, score, kv, ratio=0.4, length=4096, samples=20):
    return {"task": task, "method": method, "context_length": length, "samples": samples, "score": score,
            "kv_kept_pct": kv, "adaptive_ratio": ratio, "max_new_tokens": 8, "seconds": 1.0, "predictions": []}


def run_file(tmp_path, name, records, profile="p.safetensors"):
    path = tmp_path / name
    path.write_text(json.dumps({"model": "m", "profile": profile, "model_id": "org/m", "date": "2026-11-28",
                                "command": f"catekv-eval m p --tasks {name}", "device": "cpu", "dtype": "float32",
                                "records": records}))
    return path


def test_target_check_from_merged_runs(tmp_path):
    first = [record("a", "full", 90, 100), record("a", "catekv", 90, 40), record("a", "snapkv", 80, 40),
             record("a", "streaming", 50, 41)]
    second = [record("b", "full", 70, 100), record("b", "catekv", 69, 44), record("b", "snapkv", 66, 44),
              record("b", "streaming", 40, 43)]
    runs = load_runs([run_file(tmp_path, "x.json", first), run_file(tmp_path, "y.json", second)])
    records = runs["org/m"]["records"]
    assert averages(records)[4096, 0.4, "catekv"] == (79.5, 42.0, 2)
    # CateKV 79.5 vs full 80.0 (-0.5), at 42% KV; +6.5 over snapkv (73.0), +34.5 over streaming (45.0): met.
    assert target_lines(records) == [
        "- met: 4096 tokens, r = 0.4, 2 tasks: CateKV 79.5 at 42.0% KV, full 80.0, snapkv 73.0 at 42.0% (+6.5), "
        "streaming 45.0 at 42.0% (+34.5)"]
    records[2]["score"] = 85  # snapkv now within 5 points of CateKV
    assert target_lines(records)[0].startswith("- missed:")
    text = render(runs, None)
    assert "## org/m" in text and "catekv-eval m p --tasks x.json" in text and "catekv-eval m p --tasks y.json" in text
    assert "| **average** (2 tasks) |" in text


def test_one_memory_budget_puts_each_r_beside_full_and_the_baselines(tmp_path):
    """--kv-fraction runs: a row per r with its budget, full attention and each baseline once, a target line per r
    (a baseline not run misses it); runs at a fixed budget are left out; a baseline at two r is refused."""
    def at(task, method, score, kv, ratio, budget):
        return {**record(task, method, score, kv, ratio=ratio, samples=40), "budget": budget, "kv_fraction": 0.43}

    full = [record(t, "full", s, 100) for t, s in (("a", 80), ("b", 60))]
    sweep = [at("a", "catekv", 80, 44, 0.2, 1145), at("b", "catekv", 59, 44, 0.2, 1145),
             at("a", "catekv", 70, 44, 0.4, 169), at("b", "catekv", 50, 44, 0.4, 169),
             at("a", "snapkv", 60, 44.5, 0.4, 1726), at("b", "snapkv", 50, 44.5, 0.4, 1726)]
    fixed = [{**record(t, "catekv", 0, 45), "budget": 256, "kv_fraction": None} for t in "ab"]  # left out
    for r in full:
        r["samples"] = 40
    files = [run_file(tmp_path, "full.json", full + fixed), run_file(tmp_path, "sweep.json", sweep)]
    lines = report.one_memory_budget(files)
    assert "| full | - | - | 70.0 | 100.0% |  | 2 |" in lines
    assert "| catekv | 0.2 | 1145 | 69.5 | 44.0% | -0.5 | 2 |" in lines
    assert "| catekv | 0.4 | 169 | 60.0 | 44.0% | -10.0 | 2 |" in lines
    assert "| snapkv | - | - | 55.0 | 44.5% | -15.0 | 2 |" in lines
    assert "- missed: 4096 tokens, r = 0.2, 2 tasks: CateKV 69.5 at 44.0% KV, full 70.0, snapkv 55.0 at 44.5% (+14.5), " \
           "streaming not run" in lines
    assert not any("| catekv | 0.4 | 256" in line or "45.0%" in line for line in lines)
    both = sweep + [at("a", "snapkv", 61, 44.5, 0.2, 1145)]
    with pytest.raises(ValueError, match="snapkv at 4096 tokens was run at several r"):
        report.one_memory_budget([files[0], run_file(tmp_path, "both.json", both)])


def test_largest_losses_worst_first():
    records = [record("a", "full", 90, 100), record("a", "catekv", 60, 40), record("b", "full", 50, 100),
               record("b", "catekv", 45, 40), record("c", "full", 80, 100), record("c", "catekv", 65, 40)]
    assert largest_losses(records) == ["a at 4096 tokens, r = 0.4: 30.0 points", "c at 4096 tokens, r = 0.4: 15.0 points"]


def test_a_task_in_two_files_is_refused(tmp_path):
    rows = [record("a", "full", 90, 100)]
    with pytest.raises(ValueError, match="both hold a / full at 4096 tokens"):
        load_runs([run_file(tmp_path, "x.json", rows), run_file(tmp_path, "y.json", rows)])


def test_profiles_are_compared_on_the_tasks_they_all_ran(tmp_path):
    """A profile's run split over two files is one row; a profile run on fewer tasks is compared on those alone."""
    both = [record(t, "catekv", score, 40, ratio=r) for t, score in (("a", 90), ("b", 50)) for r in (0.2, 0.4)]
    split = [run_file(tmp_path, "x1.json", both[:2], "smollm2-135m-instruct"),
             run_file(tmp_path, "x2.json", both[2:], "smollm2-135m-instruct")]
    only_a = run_file(tmp_path, "y.json", [record("a", "catekv", 70, 40, ratio=r) for r in (0.2, 0.4)],
                      "smollm2-135m-instruct-8k")
    rows = [line for line in report.comparison([*split, only_a]) if line.startswith("| `smollm2")]
    assert len(rows) == 2
    # task b left out where y.json lacks it; the last column averages all the profile's tasks: (90 + 50) / 2
    assert rows[0].endswith("| catekv | 90.0 (40.0%) | 90.0 (40.0%) | 1 | 70.0 / 70.0 (2) |")
    assert rows[1].endswith("| catekv | 70.0 (40.0%) | 70.0 (40.0%) | 1 | 70.0 / 70.0 (1) |")
    alone = [line for line in report.comparison(split) if line.startswith("| `smollm2")]
    assert alone == [alone[0]]  # (90 + 50) / 2 either way
    assert alone[0].endswith("| catekv | 70.0 (40.0%) | 70.0 (40.0%) | 2 | 70.0 / 70.0 (2) |")
    with pytest.raises(ValueError, match="both hold a / catekv .* with one profile"):
        report.comparison([split[0], split[0]])


def test_other_sample_counts_get_their_own_tables_and_a_missing_r_a_dash(tmp_path):
    both = run_file(tmp_path, "a.json", [record("a", "catekv", 80, 30, ratio=r) for r in (0.2, 0.4)],
                    "smollm2-135m-instruct")
    one_ratio = run_file(tmp_path, "b.json", [record("a", "catekv", 60, 28, ratio=0.2)], "smollm2-135m-instruct-4k")
    forty = run_file(tmp_path, "c.json", [record("a", "catekv", 50, 29, ratio=0.2, samples=40)],
                     "smollm2-135m-instruct-8k")
    full = run_file(tmp_path, "f.json", [record("a", "full", 90, 100, ratio=0.4)], "smollm2-135m-instruct")
    lines = report.comparison([both, one_ratio, forty, full])
    twenty_at = lines.index("4096 tokens, 20 samples per task:")
    forty_at = lines.index("4096 tokens, 40 samples per task:")
    assert lines[twenty_at + 2] == "| profile | method | r = 0.2 | r = 0.4 | tasks | r = 0.2 / 0.4 on all its tasks (tasks) |"
    # full attention first, and in every column: r does not change it
    assert lines[twenty_at + 4].endswith("| full | 90.0 (100.0%) | 90.0 (100.0%) | 1 | 90.0 / 90.0 (1) |")
    assert lines[twenty_at + 5].endswith("| catekv | 80.0 (30.0%) | 80.0 (30.0%) | 1 | 80.0 / 80.0 (1) |")
    assert lines[twenty_at + 6].endswith("| catekv | 60.0 (28.0%) | - | 1 | 60.0 / - (1) |")
    assert lines[forty_at + 2] == "| profile | method | r = 0.2 | tasks | r = 0.2 on all its tasks (tasks) |"
    assert lines[forty_at + 4].endswith("| catekv | 50.0 (29.0%) | 1 | 50.0 (1) |")


def test_the_committed_page_is_what_its_command_writes(tmp_path):
    """docs/accuracy.md is the output of the command in catekv_eval/report.py's docstring on the committed results
    (so the page stays true, and the command keeps working when files move)."""
    results = ROOT / "docs" / "results"
    out = tmp_path / "accuracy.md"
    report.main([*map(str, sorted(results.glob("accuracy_*.json"))), "--memory",
                 *map(str, sorted((results / "r2").glob("accuracy_*_kv43_*.json"))),
                 *map(str, sorted((results / "r2").glob("accuracy_smollm2_*_s40_full.json"))),
                 *map(str, sorted(results.glob("accuracy_qwen_*.json"))), "--compare",
                 *map(str, sorted((results / "r2").glob("accuracy_*.json"))),
                 *map(str, sorted(results.glob("accuracy_qwen_*.json"))), "-o", str(out)])
    assert out.read_text() == (ROOT / "docs" / "accuracy.md").read_text()
