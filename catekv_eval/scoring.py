"""RULER's official scoring of synthetic tasks, and a check that evaluation data is not profiling data.

RULER (``scripts/eval/synthetic/constants.py``) cleans each prediction (strip, control
characters to newlines) and scores a task with one of two string-match metrics, both
case-insensitive substring tests, as a percentage rounded to 2 decimals:

* ``string_match_all``: per sample, the fraction of its references found in the prediction
  (all synthetic tasks);
* ``string_match_part``: per sample, 1 if any reference is found (RULER's QA tasks).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

from catekv_eval.tasks import TASKS, EvalSample, EvalTaskError

__all__ = [
    "postprocess_prediction",
    "reference_overlap",
    "score",
    "string_match_all",
    "string_match_part",
]

_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")


class ReferenceText(Protocol):
    """A profiler reference sample (``catekv_profiler.reference.ReferenceSample``) as seen here."""

    text: str
    input_ids: list[int]


def postprocess_prediction(prediction: str) -> str:
    """RULER's ``postprocess_pred``: strip, turn control characters into newlines, strip again."""
    return _CONTROL_CHARS.sub("\n", prediction.strip()).strip()


def _check_pairs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if not predictions or len(predictions) != len(references):
        raise ValueError(
            f"need one list of references per prediction and at least one prediction "
            f"(got {len(predictions)} predictions, {len(references)} reference lists)."
        )
    if any(not refs for refs in references):
        raise ValueError("every sample needs at least one reference string.")


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's ``string_match_all``: mean over samples of the fraction of references found in the prediction, x100.

    Matching is a case-insensitive substring test; the result is rounded to 2 decimals.
    """
    _check_pairs(predictions, references)
    total = sum(
        sum(r.lower() in pred.lower() for r in refs) / len(refs) for pred, refs in zip(predictions, references)
    )
    return round(total / len(predictions) * 100, 2)


def string_match_part(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's ``string_match_part``: percentage of samples whose prediction contains any reference.

    Matching is a case-insensitive substring test; the result is rounded to 2 decimals.
    """
    _check_pairs(predictions, references)
    total = sum(any(r.lower() in pred.lower() for r in refs) for pred, refs in zip(predictions, references))
    return round(total / len(predictions) * 100, 2)


def score(task: str, predictions: Sequence[str], samples: Sequence[EvalSample]) -> float:
    """RULER's score of ``task``: its metric over the post-processed predictions, one per sample.

    Raises:
        EvalTaskError: unknown task, or a sample of another task.
        ValueError: no predictions, or not one per sample.
    """
    if task not in TASKS:
        raise EvalTaskError(f"unknown task {task!r}; choose one of {sorted(TASKS)}.")
    if any(s.task != task for s in samples):
        raise EvalTaskError(f"score({task!r}) got samples of other tasks: {sorted({s.task for s in samples})}.")
    metric = string_match_all if TASKS[task].metric == "all" else string_match_part
    return metric([postprocess_prediction(p) for p in predictions], [s.answers for s in samples])


def _ids_key(ids: Sequence[int]) -> str:
    # Delimiters on both sides make substring search match whole tokens only.
    return "," + ",".join(map(str, ids)) + ","


def reference_overlap(eval_samples: Sequence[EvalSample], reference_samples: Sequence[ReferenceText]) -> int:
    """Number of evaluation samples that equal or contain a profiler reference sample.

    A sample overlaps if its prompt contains a reference text, or its ``input_ids`` contain a
    reference's ``input_ids`` as a contiguous run. Empty references are ignored (they would
    match everything). Evaluation data must not overlap the profiling data: expect 0.
    """
    refs = [(r.text, _ids_key(r.input_ids)) for r in reference_samples if r.text and r.input_ids]
    return sum(
        any(text in sample.prompt or ids in key for text, ids in refs)
        for sample, key in ((s, _ids_key(s.input_ids)) for s in eval_samples)
    )
