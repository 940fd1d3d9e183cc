"""Reports on a CateKV profile: a JSON-serialisable summary, its text form, sample agreement, and a plot.

``catekv-profile show PROFILE`` prints :func:`format_summary` of :func:`summarize`; ``--png FILE`` calls
:func:`plot_profile`. Only :func:`plot_profile` needs matplotlib (the ``plot`` extra), imported lazily.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from catekv_runtime.files import replacing
from catekv_runtime.profile import UNLIMITED_BUDGET, Profile, adaptive_head_count

DEFAULT_CONTEXT_LENGTHS = (4096, 32768, 131072)
PROVENANCE_KEYS = ("tool", "created", "torch", "transformers", "device", "dtype")


# ---------------------------------------------------------------------------------------------- agreement


def per_sample_adaptive_sets(profile: Profile) -> torch.Tensor:
    """Bool ``[num_samples, num_layers * num_kv_heads]``: each sample's ``ceil(r * N)`` lowest-CV heads.

    Ties go to the lower flat index (``layer * num_kv_heads + head``). Unlike the quantile vote, this gives
    every sample a set of exactly the final map's size, so the sets can be compared with each other and
    with the head map on equal terms.
    """
    samples = profile.cv.shape[0]
    flat = profile.cv.reshape(samples, -1).double()
    count = adaptive_head_count(profile.params.adaptive_ratio, flat.shape[1])  # the vote's count
    order = torch.sort(flat, dim=1, stable=True).indices
    sets = torch.zeros_like(flat, dtype=torch.bool)
    sets.scatter_(1, order[:, :count], True)
    return sets


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Jaccard index of every row of bool ``a [m, N]`` with every row of bool ``b [n, N]``: ``[m, n]``.

    Two empty sets count as identical (1.0): with r = 0 every set is empty, and the samples do agree.
    """
    a, b = a.double(), b.double()
    inter = a @ b.T
    union = a.sum(1, keepdim=True) + b.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks (0-based) of a 1-D tensor, tied values sharing the mean of their ranks, as Spearman's rho needs."""
    sorted_values, order = torch.sort(x, stable=True)
    _, group, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0)
    mean_rank = (ends - counts + ends - 1).double() / 2  # mean of positions start .. end-1 of each group
    ranks = torch.empty_like(mean_rank[group])
    ranks[order] = mean_rank[group]
    return ranks


def _rank_correlations(cv: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of the flat CVs of every pair of samples, ``[S, S]``; NaN where undefined.

    Undefined means a sample whose CVs are all equal (its ranks have no variance).
    """
    ranks = torch.stack([_average_ranks(row) for row in cv.reshape(cv.shape[0], -1).double()])
    centred = ranks - ranks.mean(dim=1, keepdim=True)
    norms = centred.norm(dim=1)
    centred = centred / torch.where(norms > 0, norms, torch.nan)[:, None]
    return centred @ centred.T


def sample_agreement(profile: Profile) -> dict[str, Any]:
    """How stable the head classification is across the reference samples (the method assumes it is).

    Each sample's adaptive set is its ``ceil(r * N)`` lowest-CV heads (ties by flat index; see
    :func:`per_sample_adaptive_sets`). Returns a JSON-serialisable dict:

    - ``num_samples``, ``heads_per_sample`` (``ceil(r * N)``), ``applicable`` (False with one sample);
    - ``jaccard_mean``, ``jaccard_min``: Jaccard overlap over all pairs of per-sample sets;
    - ``jaccard_with_head_map_mean``, ``jaccard_with_head_map_min``: each per-sample set against the final
      head map;
    - ``unanimous_fraction``: heads whose vote (``profile.votes``) is 0 or ``num_samples``;
    - ``rank_correlation_mean``: mean over pairs of samples of Spearman's rho between their CVs (average
      ranks for ties); pairs involving a sample with constant CVs are skipped, None if no pair is left.

    Jaccard of two empty sets is defined as 1.0 (r = 0 gives empty sets; r = 1 gives full ones, also 1.0).
    With fewer than two samples there is nothing to agree with: every measure is None, not a fake 1.0.
    """
    samples = profile.cv.shape[0]
    total = profile.num_layers * profile.num_kv_heads
    result: dict[str, Any] = {
        "num_samples": samples,
        "heads_per_sample": adaptive_head_count(profile.params.adaptive_ratio, total),
        "applicable": samples >= 2,
        "jaccard_mean": None,
        "jaccard_min": None,
        "jaccard_with_head_map_mean": None,
        "jaccard_with_head_map_min": None,
        "unanimous_fraction": None,
        "rank_correlation_mean": None,
    }
    if samples < 2:
        return result

    sets = per_sample_adaptive_sets(profile)
    pairs = torch.triu_indices(samples, samples, offset=1)
    pairwise = _jaccard(sets, sets)[pairs[0], pairs[1]]
    with_map = _jaccard(sets, profile.head_map.reshape(1, -1))[:, 0]
    votes = profile.votes
    unanimous = (votes == 0) | (votes == samples)
    rho = _rank_correlations(profile.cv)[pairs[0], pairs[1]]
    rho = rho[~rho.isnan()]
    result.update(
        jaccard_mean=pairwise.mean().item(),
        jaccard_min=pairwise.min().item(),
        jaccard_with_head_map_mean=with_map.mean().item(),
        jaccard_with_head_map_min=with_map.min().item(),
        unanimous_fraction=unanimous.double().mean().item(),
        rank_correlation_mean=rho.mean().item() if rho.numel() else None,
    )
    return result


# ---------------------------------------------------------------------------------------------- summary


def summarize(profile: Profile, context_lengths: Sequence[int] = DEFAULT_CONTEXT_LENGTHS) -> dict[str, Any]:
    """A JSON-serialisable summary of ``profile``: what :func:`format_summary` prints.

    Sections: ``model``, ``parameters``, ``reference``, ``provenance`` (the standard keys, None when absent,
    then any others), ``adaptive_heads`` (total, fraction, and per layer the count and head indices),
    ``budgets`` (heads per budget kind, from ``profile.budgets``), ``kv_kept`` (fraction of the full KV cache
    kept at each of ``context_lengths``, via :meth:`Profile.kv_kept_fraction`, which also handles prompts
    shorter than the budget) and ``agreement`` (:func:`sample_agreement`).
    """
    m, p, ref = profile.model, profile.params, profile.reference
    provenance: dict[str, str | None] = {key: profile.provenance.get(key) for key in PROVENANCE_KEYS}
    provenance.update({k: v for k, v in profile.provenance.items() if k not in provenance})

    per_layer = []
    for layer, row in enumerate(profile.head_map):
        heads = row.nonzero().flatten().tolist()
        per_layer.append({"layer": layer, "count": len(heads), "heads": heads})

    # Count from the stored budgets, not the head map, so the report shows what the runtime will use.
    adaptive_budget = profile.budgets == UNLIMITED_BUDGET
    return {
        "model": {
            "id": m.model_id,
            "revision": m.revision,
            "architecture": m.architecture,
            "num_layers": m.num_layers,
            "num_kv_heads": m.num_kv_heads,
            "num_attention_heads": m.num_attention_heads,
            "head_dim": m.head_dim,
        },
        "parameters": {
            "k": p.percentile,
            "alpha": p.alpha,
            "r": p.adaptive_ratio,
            "eta": p.eta,
            "budget": p.budget,
            "chunk": p.chunk_size,
            "L_obs": p.obs_window,
            "L_init": p.init_tokens,
            "L_rec": p.recent_tokens,
            "reserve": p.reserve_tokens,
            "tie_rule": p.tie_rule,
        },
        "reference": {
            "task": ref.task,
            "context_length": ref.context_length,
            "num_samples": ref.num_samples,
            "seed": ref.seed,
            "text_hash": ref.text_hash,
        },
        "provenance": provenance,
        "adaptive_heads": {
            "total": int(profile.head_map.sum().item()),
            "num_heads": profile.num_layers * profile.num_kv_heads,
            "fraction": profile.adaptive_fraction,
            "per_layer": per_layer,
        },
        "budgets": {
            "consistent_heads": int((~adaptive_budget).sum().item()),
            "consistent_tokens": sorted({int(b) for b in profile.budgets[~adaptive_budget].tolist()}),
            "consistent_middle_chunks": sorted({p.budget_chunks(int(b)) for b in profile.budgets[~adaptive_budget].tolist()}),
            "adaptive_heads": int(adaptive_budget.sum().item()),
            "adaptive_eta": p.eta,
        },
        "kv_kept": [{"context_length": int(n), "fraction": profile.kv_kept_fraction(int(n))} for n in context_lengths],
        "agreement": sample_agreement(profile),
        "calibration": calibration_summary(profile),
    }


def calibration_summary(profile: Profile) -> dict[str, Any] | None:
    """How k and alpha were chosen (``catekv-profile --calibrate``), or None when they were set by hand."""
    c = profile.calibration
    if "table" not in c:
        return None
    return {
        "seed": int(c["seed"]),
        "tasks": c["tasks"].split(","),
        "samples_per_task": int(c["samples_per_task"]),
        "context_length": int(c["context_length"]),
        "adaptive_ratio": float(c["adaptive_ratio"]),
        # Profiles calibrated before --calibration-ratios were scored at their own r only.
        "ratios": [float(r) for r in c.get("ratios", c["adaptive_ratio"]).split(",")],
        "full_attention_score": float(c["full_attention_score"]),
        "chosen": json.loads(c["chosen"]),
        # Profiles calibrated before the one-standard-error rule took the best mean score.
        "rule": c.get("rule", "best"),
        "rows": sorted(json.loads(c["table"]), key=lambda row: -row["score"]),
        # Calibrated with --kv-fraction: each r at its budget for this share of the KV, and r chosen too.
        "kv_fraction": float(c["kv_fraction"]) if "kv_fraction" in c else None,
    }


def ratio_choice(calibration: dict[str, Any]) -> str:
    """The sentence saying how r was chosen at one memory budget (``--calibrate --kv-fraction``), or ""."""
    if calibration.get("kv_fraction") is None:
        return ""
    chosen = calibration["chosen"]
    return (f"Each r was scored with the largest budget that keeps at most {calibration['kv_fraction']:.0%} of the "
            f"KV; r = {chosen['r']:g} (budget {chosen['budget']}) scored best with the chosen k and alpha.")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "n/a" if value is None else format(value, fmt)


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable text of a :func:`summarize` dict (also after a JSON round trip), for the terminal."""
    m, p, ref = summary["model"], summary["parameters"], summary["reference"]
    heads, budgets, agree = summary["adaptive_heads"], summary["budgets"], summary["agreement"]
    params = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())
    provenance = ", ".join(f"{k}: {'unknown' if v is None else v}" for k, v in summary["provenance"].items())
    lines = [
        f"CateKV profile of {m['id']} @ {m['revision']} ({m['architecture']})",
        f"  {m['num_layers']} layers x {m['num_kv_heads']} KV heads ({m['num_attention_heads']} attention heads), "
        f"head_dim {m['head_dim']}",
        f"Parameters: {params}",
        f"Reference: {ref['task']}, {ref['context_length']} tokens, {_plural(ref['num_samples'], 'sample')}, "
        f"seed {ref['seed']}, text hash {ref['text_hash']}",
        f"Provenance: {provenance}",
        f"Adaptive heads: {heads['total']} of {heads['num_heads']} ({heads['fraction']:.1%})",
    ]
    width = len(str(max(len(heads["per_layer"]) - 1, 0)))
    for row in heads["per_layer"]:
        listed = f"[{', '.join(map(str, row['heads']))}]" if row["heads"] else "-"
        lines.append(f"  layer {row['layer']:>{width}}: {row['count']}  {listed}")

    tokens = "/".join(map(str, budgets["consistent_tokens"])) or str(p["budget"])
    eta = budgets["adaptive_eta"]
    keeps = "their full cache" if eta >= 1 else f"{eta:g} of their middle chunks"
    chunks = "/".join(map(str, budgets["consistent_middle_chunks"])) or "0"
    # Summaries of version-1 profiles saved as JSON before the reserve and the tie rule read as 0 and exact.
    reserve, tie_rule = p.get("reserve", 0), p.get("tie_rule", "exact")
    extra = f"a {reserve}-token reserve and " if reserve else ""
    vote = ("exact: ceil(r x heads) heads, ties by mean CV" if tie_rule == "exact"
            else "inclusive: also every head tied with the last one (the authors' rule)")
    lines += [
        f"Budgets: {budgets['consistent_heads']} consistent heads keep {tokens} tokens "
        f"({p['L_init']} initial + {chunks} chunks of {p['chunk']} + {p['L_rec']} recent), plus {extra}the prompt's "
        f"remainder of a chunk; {budgets['adaptive_heads']} adaptive heads keep {keeps}",
        f"Vote: {vote}",
        "KV cache kept (fraction of full):",
    ]
    for row in summary["kv_kept"]:
        fraction = row["fraction"]
        smaller = f"{1 / fraction:.2f}x smaller" if fraction > 0 else "nothing kept"
        lines.append(f"  {row['context_length']:>9,} tokens: {fraction:6.1%}  ({smaller})")

    if not agree["applicable"]:
        lines.append(f"Sample agreement: n/a ({_plural(agree['num_samples'], 'sample')}; needs at least 2)")
    else:
        lines += [
            f"Sample agreement ({agree['num_samples']} samples, {agree['heads_per_sample']} lowest-CV heads each):",
            f"  Jaccard between samples:     mean {_num(agree['jaccard_mean'])}, min {_num(agree['jaccard_min'])}",
            f"  Jaccard with final head map: mean {_num(agree['jaccard_with_head_map_mean'])}, "
            f"min {_num(agree['jaccard_with_head_map_min'])}",
            f"  Unanimous votes:             {_num(agree['unanimous_fraction'], '.1%')} of heads",
            f"  CV rank correlation:         mean {_num(agree['rank_correlation_mean'])} (Spearman, over pairs)",
        ]
    if summary.get("calibration"):
        lines += format_calibration(summary["calibration"])
    return "\n".join(lines)


def versus_chosen(row: dict[str, Any], rows: list[dict[str, Any]], chosen: dict[str, float]) -> str:
    """"1.58 ± 2.10 below" (or "above"): how far a setting's score is from the chosen one's, with the standard
    error of their paired per-sample differences; "" for the chosen row and for calibrations that did not record
    it. Under the one-standard-error rule a setting can score above the chosen one."""
    if "se_vs_chosen" not in row or (row["k"], row["alpha"]) == (chosen["k"], chosen["alpha"]):
        return ""
    chosen_row = next(r for r in rows if (r["k"], r["alpha"]) == (chosen["k"], chosen["alpha"]))
    gap = chosen_row["score"] - row["score"]
    return f"{abs(gap):.2f} ± {row['se_vs_chosen']:.2f} {'above' if gap < 0 else 'below'}"


# How each calibration rule chose (catekv_profiler.cli.CALIBRATION_RULES), in words for `show` and the card.
RULE_TEXT = {
    "one-se": "the paper's k 0.99 / alpha 1 unless a setting scores more than one standard error above it",
    "best": "the best mean score",
}


def format_calibration(calibration: dict[str, Any]) -> list[str]:
    """Terminal lines of a :func:`calibration_summary`: the settings tried, best first, the chosen one marked."""
    lines = [
        f"Calibration: k and alpha chosen on {', '.join(calibration['tasks'])} ({calibration['samples_per_task']} "
        f"samples each, {calibration['context_length']} tokens, seed {calibration['seed']}, "
        f"r={','.join(f'{r:g}' for r in calibration['ratios'])}); full attention scores "
        f"{calibration['full_attention_score']:.2f}; rule: {RULE_TEXT[calibration['rule']]}"
    ]
    if ratio_choice(calibration):
        lines.append(f"  {ratio_choice(calibration)}")
    chosen = calibration["chosen"]
    for row in calibration["rows"]:
        mark = "  <- chosen" if (row["k"], row["alpha"]) == (chosen["k"], chosen["alpha"]) else ""
        at = "".join(f", {score:.2f} at r={r}" for r, score in row.get("by_ratio", {}).items())
        versus = versus_chosen(row, calibration["rows"], chosen)
        versus = f"  {versus} the chosen" if versus else ""
        lines.append(f"  k={row['k']:<6g} alpha={row['alpha']:<4g} score {row['score']:6.2f}  "
                     f"({row['adaptive_heads']} adaptive heads{at}){mark}{versus}")
    return lines


# ---------------------------------------------------------------------------------------------- plot


def plot_profile(profile: Profile, path: str | os.PathLike[str]) -> Path:
    """Draw ``profile`` to a PNG at ``path`` (written atomically) and return the path.

    Top: mean CV over samples per layer (x) and KV head (y); bottom: votes (samples in which each head was
    adaptive). Adaptive heads of the final map are marked with a dot in both. Needs matplotlib
    (``pip install "catekv[plot]"``); raises :class:`ImportError` saying so when it is missing.
    """
    try:
        # Figure + the Agg canvas directly, not pyplot: no display needed and no global backend switch.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ImportError('plotting a profile needs matplotlib: pip install "catekv[plot]"') from None

    layers, heads = profile.num_layers, profile.num_kv_heads
    samples = profile.cv.shape[0]
    mean_cv = profile.cv.mean(dim=0).T.numpy()  # [heads, layers]: layers along x, as there are usually more
    votes = profile.votes.T.numpy()
    marked_heads, marked_layers = profile.head_map.T.nonzero(as_tuple=True)

    width = min(max(0.28 * layers + 3.0, 7.0), 20.0)
    panel = min(max(0.32 * heads + 1.2, 2.2), 6.0)
    fig = Figure(figsize=(width, 2 * panel + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    # Marker about a third of a cell wide (in points^2), so it stays visible but does not hide the colour.
    cell_pt = min(72 * width * 0.8 / layers, 72 * panel * 0.75 / heads)
    marker_size = min(max(2.0, (cell_pt / 3) ** 2), 80.0)

    r = profile.params.adaptive_ratio
    fig.suptitle(
        f"{profile.model.model_id}\nCateKV profile, r = {r:g}: {int(profile.head_map.sum())} of {layers * heads} "
        f"KV heads adaptive (dots), {_plural(samples, 'sample')}"
    )
    top, bottom = fig.subplots(2, 1, sharex=True)
    panels = (
        (top, mean_cv, "viridis", None, "mean CV of chunk hits", "(a) mean CV over samples; low CV = adaptive"),
        (bottom, votes, "Blues", (0, max(samples, 1)), f"votes (of {samples})", "(b) samples voting a head adaptive"),
    )
    for ax, values, cmap, limits, label, title in panels:
        vmin, vmax = limits if limits else (None, None)
        image = ax.imshow(
            values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", origin="lower", interpolation="nearest"
        )
        ax.scatter(
            marked_layers.numpy(), marked_heads.numpy(), s=marker_size, c="white", edgecolors="black",
            linewidths=0.5,
        )
        ax.set_title(title, fontsize="medium")
        ax.set_ylabel("KV head")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        # Votes are counts: integer ticks only, even with one or two samples.
        fig.colorbar(image, ax=ax, label=label, ticks=MaxNLocator(integer=True) if limits else None)
    bottom.set_xlabel("layer")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))

    with replacing(path) as tmp:
        with open(tmp, "xb") as f:
            fig.savefig(f, format="png", dpi=120)
    return Path(path)


__all__ = [
    "DEFAULT_CONTEXT_LENGTHS",
    "format_summary",
    "per_sample_adaptive_sets",
    "plot_profile",
    "sample_agreement",
    "summarize",
]
