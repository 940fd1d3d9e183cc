"""Profiles on the Hugging Face Hub: a model card for a profile, and pushing both in one commit.

``catekv-profile push PROFILE REPO_ID`` calls :func:`push_profile`: it validates the profile, creates the model
repo if needed, and commits ``profile.safetensors``, a generated ``README.md`` (:func:`model_card`) and
``headmap.png`` (:func:`catekv_profiler.report.plot_profile`; left out with a warning without matplotlib) in a
single commit. Loading by id is ``catekv_runtime.load_profile("org/name")``. Needs ``huggingface_hub``.

The token (``token=``, else huggingface_hub's usual ``HF_TOKEN`` / ``hf auth login``) is only ever handed to
huggingface_hub; failures are re-raised as :class:`HubError` with a message that never contains it.
"""

from __future__ import annotations

import http
import json
import os
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from catekv_runtime.files import markdown_table
from catekv_runtime.profile import PROFILE_FILENAME, Profile, is_hub_id, load_profile

from . import __version__
from .report import RULE_TEXT, plot_profile, ratio_choice, summarize, versus_chosen

CARD_FILENAME = "README.md"
IMAGE_FILENAME = "headmap.png"
PAPER_URL = "https://proceedings.mlr.press/v267/jiang25e.html"

CITATION = """\
@inproceedings{pmlr-v267-jiang25e,
  title     = {{C}ate{KV}: On Sequential Consistency for Long-Context {LLM} Inference Acceleration},
  author    = {Jiang, Haoyun and Li, Haolin and Zhang, Jianwei and Huang, Fei and Hu, Qiang and Sun, Minmin and
               Xiao, Shuai and Li, Yong and Lin, Junyang and Yao, Jiangchao},
  booktitle = {Proceedings of the 42nd International Conference on Machine Learning (ICML)},
  series    = {Proceedings of Machine Learning Research},
  volume    = {267},
  pages     = {27569--27585},
  year      = {2025},
  publisher = {PMLR},
  url       = {https://proceedings.mlr.press/v267/jiang25e.html}
}"""


class HubError(RuntimeError):
    """A push to the Hub failed; the message says which step, and what was (not) committed."""


class UnchangedWarning(UserWarning):
    """The repo already holds exactly these files: no commit was made (the Hub refuses empty commits)."""


# ---------------------------------------------------------------------------------------------- model card


def _cell(value: Any) -> str:
    """A value as a Markdown table cell."""
    if value is None:
        text = "-"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (dict, list)):
        text = json.dumps(value, sort_keys=True)
    else:
        text = str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ") or "-"


def _table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> list[str]:
    return markdown_table([h if h != "" else " " for h in header], rows, _cell)  # an empty header stays empty


def accuracy_table(accuracy: Any) -> list[str]:
    """Markdown table lines for measured accuracy, as given to ``--accuracy-json``.

    Accepted shapes: ``{"task": score, ...}``; ``{"task": {"column": value, ...}, ...}``; a list of row
    objects ``[{"column": value, ...}, ...]``; or the JSON that ``catekv-eval --out`` writes (its records,
    without the predictions). Raises ``ValueError`` for anything else.
    """
    if isinstance(accuracy, Mapping) and isinstance(accuracy.get("records"), list):
        accuracy = [{k: v for k, v in row.items() if k not in ("predictions", "seconds")}
                    for row in accuracy["records"] if isinstance(row, Mapping)]
    values = list(accuracy.values()) if isinstance(accuracy, Mapping) else []
    if values and all(not isinstance(v, (Mapping, list)) for v in values):
        return _table(["task", "score"], list(accuracy.items()))
    if values and all(isinstance(v, Mapping) for v in values):
        columns = list(dict.fromkeys(k for row in accuracy.values() for k in row))
        return _table(["task", *columns], [[task, *(row.get(c) for c in columns)] for task, row in accuracy.items()])
    if isinstance(accuracy, list) and accuracy and all(isinstance(row, Mapping) for row in accuracy):
        columns = list(dict.fromkeys(k for row in accuracy for k in row))
        return _table(columns, [[row.get(c) for c in columns] for row in accuracy])
    raise ValueError(
        "accuracy must be a non-empty JSON object {task: score}, an object {task: {column: value}}, "
        "or a list of row objects [{column: value}, ...]"
    )


def _head_grid(profile: Profile, per_line: int = 8) -> list[str]:
    """Adaptive heads per layer, compactly: ``layer: A/. per KV head (count)``, several layers per line."""
    width = len(str(profile.num_layers - 1))
    cells = [
        f"{layer:>{width}} {''.join('A' if a else '.' for a in row.tolist())} ({int(row.sum())})"
        for layer, row in enumerate(profile.head_map)
    ]
    return ["   ".join(cells[i : i + per_line]) for i in range(0, len(cells), per_line)]


def model_card(
    profile: Profile, repo_id: str, accuracy: Any = None, *, image: str | None = IMAGE_FILENAME
) -> str:
    """The README.md (model card) of a Hub repo holding ``profile`` as ``profile.safetensors``.

    ``accuracy``: measured results to show (see :func:`accuracy_table`), or None for "not measured".
    ``image``: file name of the head map in the repo, or None if the repo has none.
    """
    summary = summarize(profile)
    m, p, ref = profile.model, profile.params, profile.reference
    heads = summary["adaptive_heads"]
    model_name = m.model_id or "an unnamed model"

    front = ["---", "library_name: catekv", "tags:", "- catekv", "- kv-cache", "- long-context"]
    if m.model_id and is_hub_id(m.model_id):
        front.append(f"base_model: {json.dumps(m.model_id)}")  # a JSON string is a valid YAML scalar
    front.append("---")

    lines = [
        *front,
        "",
        f"# CateKV profile of {model_name}",
        "",
        f"A [CateKV]({PAPER_URL}) head profile (ICML 2025) for `{model_name}`, in `{PROFILE_FILENAME}`. It says "
        "which KV heads of the model are *adaptive* (they keep their full KV cache) and which are *consistent* "
        "(they keep a fixed budget of tokens: the first tokens, the chunks the head keeps attending to, and "
        "the recent tokens), together with the per-sample statistics the choice was made from. With it, the "
        "`catekv_runtime` package runs the model with a hybrid KV cache that keeps a fraction of the full "
        "cache at long context. It holds no model weights: use it with the base model below. The file format "
        "is documented in catekv's `docs/profile-format.md` (safetensors, no pickle).",
        "",
        "## Base model",
        "",
        *_table(
            ["", ""],
            [
                ["model", f"`{m.model_id}`" if m.model_id else "-"],
                ["revision", _revision(m.revision)],
                ["architecture", m.architecture],
                ["layers x KV heads", f"{m.num_layers} x {m.num_kv_heads}"],
                ["attention heads, head_dim", f"{m.num_attention_heads}, {m.head_dim}"],
            ],
        ),
        "",
        "## Parameters",
        "",
        *_table(
            ["parameter", "symbol", "value"],
            [
                ["percentile threshold", "k", p.percentile],
                ["threshold scaling factor", "alpha", p.alpha],
                ["adaptive head ratio", "r", p.adaptive_ratio],
                ["retention ratio of adaptive heads", "eta", p.eta],
                ["token budget of a consistent head", "B", p.budget],
                ["chunk size", "c", p.chunk_size],
                ["observation window", "L_obs", p.obs_window],
                ["initial tokens", "L_init", p.init_tokens],
                ["recent tokens", "L_rec", p.recent_tokens],
                ["reserve kept as tail, left out of the statistics", "-", p.reserve_tokens],
                ["vote tie rule", "-", p.tie_rule],
            ],
        ),
        "",
        "## Adaptive heads",
        "",
        f"{heads['total']} of {heads['num_heads']} KV heads are adaptive (fraction {heads['fraction']:.3f}); the "
        f"other {heads['num_heads'] - heads['total']} keep {p.budget} tokens each. Per layer "
        "(`A` = adaptive, `.` = consistent, one character per KV head; adaptive count in brackets):",
        "",
        "```",
        *_head_grid(profile),
        "```",
        "",
        "## KV cache kept",
        "",
        "Fraction of the full KV cache kept after prefilling a prompt of each length (from the head map and "
        "budgets; decoded tokens are appended to every head):",
        "",
        *_table(
            ["context length", "KV cache kept", "smaller by"],
            [
                [f"{row['context_length']:,}", f"{row['fraction']:.1%}",
                 f"{1 / row['fraction']:.2f}x" if row["fraction"] > 0 else "-"]
                for row in summary["kv_kept"]
            ],
        ),
        "",
        "## Sample agreement",
        "",
        *_agreement(summary["agreement"]),
        "",
        "## Head map",
        "",
    ]
    if image:
        lines += [
            f"![CateKV head map of {model_name}]({image})",
            "",
            "Top: mean coefficient of variation (CV) of chunk hits per layer and KV head (low = adaptive); "
            "bottom: the number of reference samples voting each head adaptive. Dots mark the adaptive heads.",
        ]
    else:
        lines.append("No image in this repo (matplotlib was not installed when it was pushed); "
                     f"`catekv-profile show {repo_id} --png headmap.png` draws it.")
    lines += ["", "## Calibration", "", *_calibration(summary["calibration"])]
    lines += ["", "## Accuracy", ""]
    if accuracy is not None:
        lines += accuracy_table(accuracy)
    else:
        lines.append("Not measured: no accuracy results were given when this profile was pushed.")
    lines += [
        "",
        "## How to use",
        "",
        "```python",
        "import catekv_runtime as ck",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"model_id = {json.dumps(m.model_id if m.model_id and is_hub_id(m.model_id) else 'BASE_MODEL')}",
        'model = AutoModelForCausalLM.from_pretrained(model_id, dtype="bfloat16", device_map="cuda")',
        "tokenizer = AutoTokenizer.from_pretrained(model_id)",
        f"profile = ck.load_profile({json.dumps(repo_id)})  # pin a commit with \"{repo_id}@<commit>\" "
        "or revision=",
        "ck.apply(model, profile)  # overrides: budget=, eta=, adaptive_ratio=, ...",
        'inputs = tokenizer(long_prompt, return_tensors="pt").to(model.device)',
        "out = model.generate(**inputs, max_new_tokens=64)",
        "ck.remove(model)  # plain attention again",
        "```",
        "",
        "`load_profile` downloads through the huggingface_hub cache and works offline from it "
        "(`HF_HUB_OFFLINE=1`). `catekv-profile show " + repo_id + "` prints a summary in a terminal.",
        "",
        "## Provenance",
        "",
        *_table(
            ["", ""],
            [
                ["reference set",
                 f"{ref.task}, {ref.num_samples} samples of {ref.context_length} tokens, seed {ref.seed}"],
                ["reference text hash (SHA-256)", f"`{ref.text_hash}`" if ref.text_hash else "-"],
                *[[f"profiler {key}", value if value is not None else "unknown"]
                  for key, value in summary["provenance"].items()],
                ["pushed with", f"catekv_profiler {__version__} (`catekv-profile push`)"],
            ],
        ),
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)


def _calibration(calibration: dict[str, Any] | None) -> list[str]:
    """The calibration section: how k and alpha were chosen (``catekv-profile --calibrate``), or that they were set."""
    if calibration is None:
        return ["k and alpha were set by hand (not calibrated with `catekv-profile --calibrate`)."]
    chosen = calibration["chosen"]
    by_ratio = calibration["ratios"] if len(calibration["ratios"]) > 1 else []  # a column per r when scored at several
    noise = all("se_vs_chosen" in row for row in calibration["rows"])  # calibrations since the paired errors
    return [
        f"k = {chosen['k']:g} and alpha = {chosen['alpha']:g} were chosen by `catekv-profile --calibrate`: every "
        "setting below was measured in the same pass over the reference samples, and its head map (at "
        f"r = {' and '.join(f'{r:g}' for r in calibration['ratios'])}{'; the mean over them' if by_ratio else ''}) "
        f"scored on {', '.join(calibration['tasks'])}, "
        f"{calibration['samples_per_task']} samples each of {calibration['context_length']:,} tokens generated with "
        f"seed {calibration['seed']} (not the evaluation's). Full attention scored "
        f"{calibration['full_attention_score']:.2f} on the same samples; these scores are for choosing, not reporting. "
        f"The rule that chose: {RULE_TEXT[calibration['rule']]}. {ratio_choice(calibration)}".rstrip(),
        "",
        *_table(["k", "alpha", "adaptive heads", "mean score", *[f"r = {r:g}" for r in by_ratio],
                 *(["against the chosen (± standard error)"] if noise else []), "chosen"],
                [[row["k"], row["alpha"], row["adaptive_heads"], f"{row['score']:.2f}",
                  *[f"{row['by_ratio'][f'{r:g}']:.2f}" for r in by_ratio],
                  *([versus_chosen(row, calibration["rows"], chosen)] if noise else []),
                  "yes" if (row["k"], row["alpha"]) == (chosen["k"], chosen["alpha"]) else ""]
                 for row in calibration["rows"]]),
    ]


def _revision(revision: str) -> str:
    if not revision:
        return "unknown"
    if re.fullmatch(r"[0-9a-f]{64}", revision):
        return f"`{revision}` (SHA-256 of the GGUF file)"
    return f"`{revision}`"


def _agreement(agree: dict[str, Any]) -> list[str]:
    if not agree["applicable"]:
        return [f"Not applicable: the profile was made from {agree['num_samples']} reference sample "
                "(agreement needs at least 2)."]

    def num(value: float | None, fmt: str = ".3f") -> str:
        return "n/a" if value is None else format(value, fmt)

    return [
        f"How stable the classification is across the {agree['num_samples']} reference samples (each sample's "
        f"{agree['heads_per_sample']} lowest-CV heads):",
        "",
        *_table(
            ["measure", "mean", "min"],
            [
                ["Jaccard overlap between samples", num(agree["jaccard_mean"]), num(agree["jaccard_min"])],
                ["Jaccard overlap with the final head map", num(agree["jaccard_with_head_map_mean"]),
                 num(agree["jaccard_with_head_map_min"])],
                ["heads voted unanimously", num(agree["unanimous_fraction"], ".1%"), "-"],
                ["CV rank correlation (Spearman, over pairs)", num(agree["rank_correlation_mean"]), "-"],
            ],
        ),
    ]


# ---------------------------------------------------------------------------------------------- push


def push_profile(
    path: str | os.PathLike[str],
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    accuracy: Any = None,
) -> str:
    """Push the profile file ``path`` to the Hub model repo ``repo_id`` in one commit; return the commit URL.

    The file is validated (:func:`~catekv_runtime.profile.load_profile`) and the card and image are built
    before any network call. The repo is created if missing (``private`` applies only then); ``revision``
    names the branch to commit to (created from ``main`` if missing; default ``main``); ``create_pr`` opens a
    pull request against it instead. The commit holds ``profile.safetensors`` (the file's exact bytes),
    ``README.md`` and ``headmap.png``. The returned string is huggingface_hub's ``CommitInfo`` (a ``str``
    subclass, the commit URL) with ``.oid`` and, for a pull request, ``.pr_url``.

    Raises :class:`~catekv_runtime.profile.ProfileError` for an invalid profile, ``ValueError`` for a bad
    ``repo_id`` or ``accuracy``, and :class:`HubError` when a Hub call fails (its message never holds the token).
    """
    try:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:
        raise HubError("pushing to the Hub needs huggingface_hub: pip install huggingface_hub") from None
    try:
        validate_repo_id(repo_id)  # the Hub's naming rules, as huggingface_hub knows them
    except HFValidationError as e:
        raise ValueError(f"{repo_id!r} is not a Hub repo id of the form 'org/name': {e}") from None
    if "/" not in repo_id:  # a bare name would land in the token owner's namespace, unsaid
        raise ValueError(f"{repo_id!r} is not a Hub repo id of the form 'org/name': it has no namespace")
    if revision is not None and (not revision.strip() or re.fullmatch(r"[0-9a-f]{40}", revision)):
        raise ValueError(f"revision must be a branch name (or omitted for main), not {revision!r}")
    # Everything local first: a bad profile, card or image never gets as far as the network.
    path = Path(path)
    profile = load_profile(path)
    data = path.read_bytes()  # Profile.save replaces files atomically, so this is a complete profile too
    image = _render_image(profile)
    card = model_card(profile, repo_id, accuracy, image=IMAGE_FILENAME if image is not None else None)
    adaptive = int(profile.head_map.sum())
    message = commit_message or (
        f"CateKV profile of {profile.model.model_id or 'a model'}: {adaptive}/{profile.head_map.numel()} adaptive "
        f"KV heads (r={profile.params.adaptive_ratio:g}, budget {profile.params.budget})"
    )

    api = HfApi(token=token, library_name="catekv", library_version=__version__)

    def failed(step: str, error: Exception, consequence: str) -> HubError:
        secret = token if token is not None else _stored_token()
        return HubError(_redact(f"{step} failed: {_describe(error)}; {consequence}", secret))

    try:
        api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
    except Exception as e:
        raise failed(f"creating the Hub repo {repo_id}", e, "nothing was uploaded") from None
    if revision and not create_pr and not revision.startswith("refs/") and revision != "main":
        try:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        except Exception as e:
            raise failed(f"creating the branch {revision!r} of {repo_id}", e, "nothing was uploaded") from None

    operations: list[Any] = [
        CommitOperationAdd(path_in_repo=PROFILE_FILENAME, path_or_fileobj=data),
        CommitOperationAdd(path_in_repo=CARD_FILENAME, path_or_fileobj=card.encode()),
    ]
    try:
        info = api.repo_info(repo_id, repo_type="model", revision=revision)
        before = info.sha
        if private and info.private is False:
            warnings.warn(f"{repo_id} already exists and is public; --private only applies when the push creates "
                          "the repo (change its visibility in its settings on the Hub)", stacklevel=2)
        if image is not None:
            operations.append(CommitOperationAdd(path_in_repo=IMAGE_FILENAME, path_or_fileobj=image))
        elif api.file_exists(repo_id, IMAGE_FILENAME, repo_type="model", revision=before or revision):
            # The head map there belongs to an older profile: remove it in the same commit.
            operations.append(CommitOperationDelete(path_in_repo=IMAGE_FILENAME))
    except Exception as e:
        raise failed(f"looking up {repo_id}" + (f" at {revision!r}" if revision else ""), e,
                     "nothing was uploaded") from None
    where = f"{repo_id}" + (f" (branch {revision})" if revision else "")
    try:
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=message,
            commit_description=f"Pushed with catekv_profiler {__version__} (`catekv-profile push`).",
            repo_type="model",
            revision=revision,
            create_pr=create_pr,
        )
    except Exception as e:
        # The Hub applies a commit atomically: an HTTP error (or a check before sending, or no connection at all)
        # means no commit; a connection lost while the commit was sent leaves it unknown.
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status is not None or isinstance(e, ValueError) or type(e).__name__ in ("ConnectError", "ConnectTimeout"):
            consequence = "nothing was committed"
        else:
            consequence = f"a Hub commit is all or nothing: check {api.endpoint}/{repo_id} for whether it landed"
        raise failed(f"upload to {where}", e, consequence) from None
    if before is not None and getattr(info, "oid", None) == before:
        warnings.warn(f"{where} already holds exactly these files (commit {before}); nothing was committed",
                      UnchangedWarning, stacklevel=2)
    return info


def _render_image(profile: Profile) -> bytes | None:
    """The head map as PNG bytes, or None (with a warning) without matplotlib. Leaves no file behind."""
    with tempfile.TemporaryDirectory(prefix="catekv-push-") as folder:
        try:
            png = plot_profile(profile, Path(folder) / IMAGE_FILENAME)
        except ImportError as e:
            warnings.warn(f"{e}; pushing without {IMAGE_FILENAME}", stacklevel=3)
            return None
        return png.read_bytes()


def _stored_token() -> str | None:
    """huggingface_hub's own token (HF_TOKEN or the login file), only to keep it out of error messages."""
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:
        return None


def _redact(text: str, secret: str | None) -> str:
    if secret and len(secret) >= 4:
        text = text.replace(secret, "***")
    return text


def _describe(error: Exception) -> str:
    """A short description of a huggingface_hub / HTTP error: status and reason, the server's message."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        reason = getattr(response, "reason_phrase", None) or getattr(response, "reason", None)
        if not reason:
            try:
                reason = http.HTTPStatus(status).phrase
            except ValueError:
                reason = ""
        text = f"HTTP {status} {reason}".rstrip()
        server = getattr(error, "server_message", None)
        if server:
            text += f" ({' '.join(str(server).split())[:300]})"
        if status in (401, 403):
            text += " - check the token: `hf auth login`, HF_TOKEN or --token, with write access to the repo"
        return text
    detail = " ".join(str(error).split())[:300]
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


__all__ = ["HubError", "UnchangedWarning", "accuracy_table", "model_card", "push_profile"]
