"""How the project writes its outputs: atomically, and their tables in Markdown.

Writing a file atomically: ``path`` holds either its old content or all of the new one, never a part. The one way
the project writes its outputs (profiles, checkpoints, plots, evaluation results, joined models, the benchmark
page): the new content goes to a hidden temporary file beside the target (same file system, so the rename is
atomic), which is flushed to disk and renamed into place; on any error it is removed and the target is left as
it was. :func:`save_safetensors` does the same for safetensors files (profiles, the profiler's checkpoints).
:func:`markdown_table` builds the tables of the model card, ``catekv-eval``'s results and the generated
pages; it lives here, beside the writer, because the profiler, the evaluation and the benchmarks all use it and
the runtime is the one package they share (it costs the runtime no dependency).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# Outputs are meant to be shared (a profile, a page): readable by all, whatever the temporary file's mode was.
FILE_MODE = 0o644


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the caller to write the new content to; when the block ends
    without an error it is flushed, given :data:`FILE_MODE` and renamed onto ``path``, else removed.

    The temporary name is hidden, unique per call (``.NAME.PID.RANDOM.partial``) and does not exist yet; the
    parent folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically (:func:`replacing`); returns the path."""
    with replacing(path) as tmp:
        with open(tmp, "xb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def save_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | os.PathLike[str]) -> Path:
    """Save a safetensors file atomically (:func:`replacing`); returns the path."""
    with replacing(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return Path(path)


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]], cell: Any = str) -> list[str]:
    """The lines of a Markdown table: the header, the ``---`` rule, one line per row; ``cell`` writes each value
    (the model card escapes them, the result pages pass formatted strings)."""
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines
