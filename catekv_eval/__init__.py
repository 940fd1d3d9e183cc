"""CateKV evaluation: RULER's synthetic tasks generated offline, with RULER's scoring.

Example::

    samples = make_samples("niah_single_1", tokenizer, context_length=4096, num_samples=20)
    predictions = [generate(s.input_ids, s.max_new_tokens) for s in samples]  # your generation loop
    score("niah_single_1", predictions, samples)  # a percentage, as RULER reports it
"""

from catekv_eval.scoring import (
    postprocess_prediction,
    reference_overlap,
    score,
    string_match_all,
    string_match_part,
)
from catekv_eval.tasks import TASKS, EvalSample, EvalTaskError, NiahConfig, TaskSpec, make_samples

__all__ = [
    "TASKS",
    "EvalSample",
    "EvalTaskError",
    "NiahConfig",
    "TaskSpec",
    "make_samples",
    "postprocess_prediction",
    "reference_overlap",
    "score",
    "string_match_all",
    "string_match_part",
]
