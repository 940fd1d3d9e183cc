"""Write docs/accuracy.md (tables, target check, plot) from ``catekv-eval --out`` JSON files.

    python -m catekv_eval.report docs/results/accuracy_*.json \
        --memory docs/results/r2/accuracy_*_kv43_*.json docs/results/r2/accuracy_smollm2_*_s40_full.json \
            docs/results/accuracy_qwen_*.json \
        --compare docs/results/r2/accuracy_*.json docs/results/accuracy_qwen_*.json -o docs/accuracy.md

``--compare`` files are runs of one model with different profiles (regions, k/alpha, calibration): a section of
their own puts each profile's averages side by side, per context length.

Files of one model may split its tasks or lengths between them (runs in parallel); their records are
merged. Nothing here computes a score: every figure comes from the records.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from catekv_runtime.files import markdown_table, write_atomically
from catekv_runtime.policies import POLICIES

# Issue #5's targets: CateKV at <= 45% KV within 1 point of full, >= 5 points above SnapKV and StreamingLLM.
MAX_KV_PCT, MAX_LOSS, MIN_MARGIN = 45.0, 1.0, 5.0
_METHOD_ORDER = {name: i for i, name in enumerate(POLICIES)}  # rows of a comparison table: full first


def load_runs(paths: Sequence[Path], by: str = "model",
              keep: Callable[[dict[str, Any]], bool] | None = None) -> dict[Any, dict[str, Any]]:
    """Runs merged per model (``by="model"``: ``{model_id: {"records": [...], "commands": [...], "dates": {...},
    ...}}``) or per model and profile (``by="profile"``: keyed ``(model_id, profile)``); ``notes`` are ``(file name,
    note)`` pairs. ``keep``: the records to take (default all); a file with none is left out. A task, method, length
    and r held twice under one key is refused."""
    runs: dict[Any, dict[str, Any]] = {}
    seen: dict[tuple, Path] = {}
    for path in paths:
        run = json.loads(Path(path).read_text())
        if keep is not None:
            run["records"] = [r for r in run["records"] if keep(r)]
            if not run["records"]:
                continue
        key = run["model_id"] if by == "model" else (run["model_id"], run["profile"])
        merged = runs.setdefault(key, {"records": [], "commands": [], "dates": set(), "devices": set(),
                                       "dtypes": set(), "profiles": set(), "notes": []})
        for r in run["records"]:  # a task run twice would be averaged twice: refuse it
            held = (key, r["context_length"], r["adaptive_ratio"], r["task"], r["method"])
            if held in seen:
                raise ValueError(f"{path} and {seen[held]} both hold {r['task']} / {r['method']} at "
                                 f"{r['context_length']} tokens, r = {r['adaptive_ratio']} with one {by}: keep one "
                                 "of them")
            seen[held] = path
        merged["records"] += run["records"]
        merged["commands"].append(run["command"])
        merged["dates"].add(run["date"])
        merged["devices"].add(run["device"])
        merged["dtypes"].add(run["dtype"])
        merged["profiles"].add(run["profile"])
        if run.get("note"):
            merged["notes"].append((Path(path).name, run["note"]))
    return runs


def note_lines(notes: Sequence[tuple[str, str]]) -> list[str]:
    """``(file name, note)`` pairs as lines, one per distinct note naming the files that carry it, and a blank line
    after them (none without notes)."""
    files: dict[str, list[str]] = {}
    for name, note in notes:
        files.setdefault(note, []).append(f"`{name}`")
    return [f"Note ({', '.join(names)}): {note}" for note, names in files.items()] + ([""] if notes else [])


def averages(records: Sequence[dict[str, Any]]) -> dict[tuple[int, float, str], tuple[float, float, int]]:
    """``{(length, r, method): (mean score over tasks, mean KV kept %, tasks)}``."""
    cells: dict[tuple[int, float, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        cells[r["context_length"], r["adaptive_ratio"], r["method"]].append(r)
    return {key: _average(rows) for key, rows in cells.items()}


def target_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """One line per (length, r): does CateKV meet the targets there?"""
    avg = averages(records)
    lines = []
    for length, ratio in sorted({(k[0], k[1]) for k in avg}):
        get = lambda m: avg.get((length, ratio, m))  # noqa: E731
        cate, full = get("catekv"), get("full")
        if cate is None or full is None:
            continue
        lines.append(target_line(f"{length} tokens, r = {ratio}", cate, full, {m: get(m) for m in RIVALS}))
    return lines


RIVALS = ("snapkv", "streaming")  # the baselines the targets name


def target_line(where: str, cate: tuple[float, float, int], full: tuple[float, float, int],
                rivals: dict[str, tuple[float, float, int] | None]) -> str:
    """``- met: ...`` or ``- missed: ...`` for CateKV's, full attention's and the rivals' (score, KV %, tasks)."""
    parts = [f"{where}, {cate[2]} tasks: CateKV {cate[0]:.1f} at {cate[1]:.1f}% KV, full {full[0]:.1f}"]
    ok = cate[1] <= MAX_KV_PCT and full[0] - cate[0] <= MAX_LOSS
    for rival, other in rivals.items():
        if other is not None:
            parts.append(f"{rival} {other[0]:.1f} at {other[1]:.1f}% ({cate[0] - other[0]:+.1f})")
            ok = ok and cate[0] - other[0] >= MIN_MARGIN
        else:
            parts.append(f"{rival} not run")
            ok = False
    return f"- {'met' if ok else 'missed'}: " + ", ".join(parts)


def largest_losses(records: Sequence[dict[str, Any]], points: float = 10.0) -> list[str]:
    """Tasks where CateKV scores ``points`` or more below full attention, worst first."""
    score = {(r["context_length"], r["adaptive_ratio"], r["task"], r["method"]): r["score"] for r in records}
    losses = sorted((full - score[k[:3] + ("catekv",)], k) for k, full in score.items()
                    if k[3] == "full" and k[:3] + ("catekv",) in score)
    return [f"{task} at {length} tokens, r = {ratio}: {full_minus:.1f} points" for full_minus, (length, ratio, task, _)
            in reversed(losses) if full_minus >= points]


def plot(runs: dict[str, dict[str, Any]], path: Path) -> None:
    """Average score against KV kept, one panel per (model, length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(model, length) for model, run in runs.items()
              for length in sorted({r["context_length"] for r in run["records"]})]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (model, length) in zip(axes[0], panels):
        avg = averages(runs[model]["records"])
        for method in dict.fromkeys(k[2] for k in avg):
            points = sorted((v[1], v[0]) for k, v in avg.items() if k[0] == length and k[2] == method)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        ax.set_title(f"{model.split('/')[-1]}, {length // 1024}K", fontsize=9)
        ax.set_xlabel("KV kept (% of full, measured)")
        ax.set_ylabel("RULER average")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def profile_label(path: str) -> str:
    """``path`` with the parameters that tell profiles of one model apart (k, alpha, reserve, tie rule, budgets)."""
    from catekv_runtime.profile import load_profile

    p = load_profile(path)
    calibrated = ", calibrated" if p.calibration else ""
    per_head = ", per-head budgets" if p.budgets[~p.head_map].unique().numel() > 1 else ""
    return (f"`{Path(path).name}` (k {p.params.percentile:g}, alpha {p.params.alpha:g}, reserve "
            f"{p.params.reserve_tokens}, {p.params.tie_rule} vote{calibrated}{per_head})")


def comparison(paths: Sequence[Path]) -> list[str]:
    """Per model, length and samples per task, one row per profile and method: the average at each r (KV kept).

    Files with the same model and profile are one run split between processes: their records are merged
    (:func:`load_runs` by profile). Runs with other numbers of samples per task get tables of their own. In a table
    the averages cover only the tasks that every compared profile ran there, so that a profile run on fewer tasks
    is compared on those tasks alone (the ``tasks`` column); a profile not run at an r has a dash there.
    """
    runs = load_runs(paths, by="profile", keep=lambda r: r.get("kv_fraction") is None)  # those are one_memory_budget's
    commands: dict[str, list[str]] = defaultdict(list)
    notes: dict[str, list[tuple[str, str]]] = defaultdict(list)  # model -> (file name, note)
    tasks_at: dict[tuple[str, int, int], set[str]] = {}  # the tasks every profile ran, per table
    ratios_at: dict[tuple[str, int, int], set[float]] = defaultdict(set)
    for (model_id, _), run in runs.items():
        commands[model_id] += run["commands"]
        notes[model_id] += run["notes"]
        for length, samples in {(r["context_length"], r["samples"]) for r in run["records"]}:
            held = [r for r in run["records"] if (r["context_length"], r["samples"]) == (length, samples)]
            key = (model_id, length, samples)
            ran = {r["task"] for r in held}
            tasks_at[key] = tasks_at[key] & ran if key in tasks_at else ran
            ratios_at[key] |= {r["adaptive_ratio"] for r in held}
    rows: dict[tuple[str, int, int], list[list[str]]] = defaultdict(list)
    for (model_id, profile), run in runs.items():
        for length, samples in sorted({(r["context_length"], r["samples"]) for r in run["records"]}):
            key = (model_id, length, samples)
            held = [r for r in run["records"] if (r["context_length"], r["samples"]) == (length, samples)]
            avg, own = averages([r for r in held if r["task"] in tasks_at[key]]), averages(held)
            for method in dict.fromkeys(k[2] for k in avg):
                cells = [(avg.get((length, r, method)), own.get((length, r, method))) for r in sorted(ratios_at[key])]
                if method == "full":  # r does not change full attention: its one run fills every column
                    cells = [next(cell for cell in cells if cell[0])] * len(cells)
                tasks = next(a[2] for a, _ in cells if a)
                everything = next(o[2] for _, o in cells if o)
                rows[key].append([profile_label(profile), method,
                                  *(f"{a[0]:.1f} ({a[1]:.1f}%)" if a else "-" for a, _ in cells), str(tasks),
                                  f"{' / '.join(f'{o[0]:.1f}' if o else '-' for _, o in cells)} ({everything})"])
    out = ["## Profiles compared: regions, calibration, budgets", "",
           "The same model and tasks with profiles that differ in how they were made. Cells: average score over "
           "the tasks (KV kept, % of full, measured) at each r; full attention keeps everything. "
           "In each table only the tasks every profile there ran are averaged (the tasks column); the last "
           "column averages every task the profile ran there, at each r.", ""]
    for model in dict.fromkeys(k[0] for k in rows):
        out += [f"### {model}", "", "Commands:", "", "```bash", *commands[model], "```", ""]
        out += note_lines(notes[model])
        for (m, length, samples), body in sorted(rows.items()):
            if m == model:
                body.sort(key=lambda row: _METHOD_ORDER.get(row[1], len(_METHOD_ORDER)))  # stable within a method
                ratios = sorted(ratios_at[m, length, samples])
                out += [f"{length} tokens, {samples} samples per task:", "",
                        *markdown_table(["profile", "method", *(f"r = {r:g}" for r in ratios), "tasks",
                                         f"r = {' / '.join(f'{r:g}' for r in ratios)} on all its tasks (tasks)"],
                                        body), ""]
    return out


def one_memory_budget(paths: Sequence[Path]) -> list[str]:
    """Per model, length and samples per task: CateKV at each r with the budget that fills one share of the KV
    (records of ``catekv-eval --kv-fraction``), full attention, and the baselines run at that share, with the targets
    checked at each r. Full attention and the baselines do not depend on r: each is one row (a baseline at two r is
    refused). Other records (runs at a fixed budget) are left out."""
    runs = load_runs(paths, keep=lambda r: r["method"] == "full" or r.get("kv_fraction") is not None)
    out = ["## At one memory budget: r against B", "",
           "CateKV at several adaptive ratios r, each with the largest budget B that keeps at most the same share of "
           "the KV (`catekv-eval --kv-fraction`), beside full attention and the baselines at that share: a lower r "
           "leaves more heads consistent and gives each a larger B. KV kept is measured, padding and decoded tokens "
           "included, so it ends slightly above the fraction asked for. The shipped profiles since 2026-12-02 are "
           "the r = 0.2 rows (`catekv-profile retarget`, catekv_profiles/README.md).", ""]
    for model, run in runs.items():
        out += [f"### {model}", "", "Commands:", "", "```bash", *run["commands"], "```", "", *note_lines(run["notes"])]
        shares = {(r["context_length"], r["samples"], r["kv_fraction"]) for r in run["records"] if r["method"] != "full"}
        for length, samples, fraction in sorted(shares):
            held = [r for r in run["records"] if (r["context_length"], r["samples"]) == (length, samples)
                    and r.get("kv_fraction") in (None, fraction)]  # full attention's records have none
            avg = sorted(averages(held).items())  # ((length, r, method), (score, KV %, tasks)), by r
            full = next(a for (_, _, method), a in avg if method == "full")  # the same run under every r
            cate = {ratio: a for (_, ratio, method), a in avg if method == "catekv"}
            rivals: dict[str, tuple[float, float, int] | None] = {}
            for (_, _, method), a in avg:
                if method not in ("full", "catekv"):
                    if method in rivals:
                        raise ValueError(f"{method} at {length} tokens was run at several r with --kv-fraction; "
                                         "keep one")
                    rivals[method] = a
            budget = {ratio: sorted({r["budget"] for r in held if r["method"] == "catekv" and r["adaptive_ratio"] == ratio})
                      for ratio in cate}
            body = [["full", "-", "-", f"{full[0]:.1f}", "100.0%", "", str(full[2])]]
            body += [["catekv", f"{ratio:g}", "/".join(map(str, budget[ratio])), f"{a[0]:.1f}", f"{a[1]:.1f}%",
                      f"{a[0] - full[0]:+.1f}", str(a[2])] for ratio, a in cate.items()]
            body += [[method, "-", "-", f"{a[0]:.1f}", f"{a[1]:.1f}%", f"{a[0] - full[0]:+.1f}", str(a[2])]
                     for method, a in rivals.items()]
            out += [f"{length} tokens, {samples} samples per task, at most {fraction:.0%} of the KV asked for:", "",
                    *markdown_table(["method", "r", "budget B", "score", "KV kept", "vs full", "tasks"], body), "",
                    *(target_line(f"{length} tokens, r = {ratio:g}", a, full,
                                  {m: rivals.get(m) for m in RIVALS}) for ratio, a in cate.items()), ""]
    return out


def _average(records: Sequence[dict[str, Any]]) -> tuple[float, float, int]:
    """(mean score, mean KV kept %, tasks) of one method's records at one length and r."""
    return (sum(r["score"] for r in records) / len(records), sum(r["kv_kept_pct"] for r in records) / len(records),
            len(records))


def render(runs: dict[str, dict[str, Any]], image: str | None, compared: Sequence[Path] = (),
           memory: Sequence[Path] = ()) -> str:
    from .run import markdown

    out = ["# Accuracy: CateKV against baselines at equal KV", "",
           "Written by `python -m catekv_eval.report` from the JSON files of `catekv-eval --out` (`docs/results/`).",
           "Tasks: RULER's synthetic tasks generated offline (`catekv_eval/tasks.py`; no QA). Every method prefills",
           "with full attention and differs only in the KV it keeps (`catekv_eval/methods.py`); KV kept is measured",
           "from the cache's bytes after decoding, padding included. Scores are RULER's string match (%).",
           "Commands are as they were run: a profile path under `profiles/` is now under `catekv_profiles/` (shipped",
           "profiles also load by name, e.g. `smollm2-135m-instruct-8k`).", ""]
    if image:
        out += [f"![score vs KV kept]({image})", ""]
    for model, run in runs.items():
        samples = sorted({r["samples"] for r in run["records"]})
        out += [f"## {model}", "",
                f"Date {', '.join(sorted(run['dates']))}; {', '.join(sorted(run['devices']))}, "
                f"{', '.join(sorted(run['dtypes']))}; {', '.join(map(str, samples))} samples per task; "
                f"profile {', '.join(sorted(run['profiles']))}.", "", "Commands:", "", "```bash"]
        out += run["commands"] + ["```", ""]
        out += note_lines(run["notes"])
        out += ["Targets (CateKV <= 45% KV, within 1 point of full, >= 5 points above "
                                  "SnapKV and StreamingLLM):", ""]
        out += target_lines(run["records"]) + [""]
        per_task = min(samples)
        out += [f"One sample moves a task's score by up to {100 / per_task:.0f} points; the standard error of an average "
                f"over T tasks of {per_task} samples is at most 50 / sqrt({per_task} T) points (binomial, p = 0.5), "
                f"{50 / (per_task * 11) ** 0.5:.1f} for 11 tasks.", ""]
        losses = largest_losses(run["records"])
        if losses:
            out += ["Tasks where CateKV is 10 points or more below full attention: " + "; ".join(losses) + ".", ""]
        out += [markdown(run["records"]), ""]
    if memory:
        out += one_memory_budget(memory)
    if compared:
        out += comparison(compared)
    return "\n".join(out).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="catekv-eval --out JSON files")
    parser.add_argument("--compare", type=Path, nargs="*", default=[],
                        help="runs of one model with different profiles, compared side by side")
    parser.add_argument("--memory", type=Path, nargs="*", default=[],
                        help="catekv-eval --kv-fraction runs (and full attention's), CateKV's r side by side at one KV share")
    parser.add_argument("-o", "--out", type=Path, default=Path("docs/accuracy.md"))
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    runs = load_runs(args.results)
    image = None
    if not args.no_plot:
        png = args.out.with_suffix(".png")
        plot(runs, png)
        image = png.name
    write_atomically(args.out, render(runs, image, args.compare, args.memory))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
