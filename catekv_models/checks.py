"""Checks of command-line input made before any compute, so that bad input costs nothing.

Shared by ``catekv-profile`` and ``catekv-eval`` (beside their shared options, so that the eval needs nothing of the
profiler); the ``check_*_option`` functions raise click's usage errors (exit code 2, one line naming the option).
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from catekv_runtime.profile import ProfileParams

__all__ = ["OutputPathError", "check_context_length_option", "check_output_option", "check_writable"]


class OutputPathError(ValueError):
    """An output file cannot be written where it was asked for; the message says why."""


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Raise :class:`OutputPathError` unless a file can be created at ``path``; return it as a Path.

    Outputs are written atomically (a temporary file beside ``path``, renamed into place) after creating
    missing parent folders, so what must hold is: ``path`` is not a folder, and the nearest existing
    ancestor is a folder that this process may write to. Checked with ``os.access``, which also sees a
    read-only file system (and, as the kernel does, lets root write to folders without write bits).
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{path} is a directory; name a file to write")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"cannot write {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(
            f"cannot write {path}: directory {ancestor} is not writable (read-only or no permission); "
            "choose another path"
        )
    return path


def check_output_option(path: Path, param_hint: str) -> None:
    """A usage error naming the option ``param_hint`` if ``path`` cannot be written."""
    try:
        check_writable(path)
    except OutputPathError as e:
        raise click.BadParameter(str(e), param_hint=param_hint) from None


def check_context_length_option(length: int, params: ProfileParams, param_hint: str, max_context: int = 0) -> None:
    """A usage error naming ``param_hint`` unless the parameters fit in ``length`` tokens and the model does.

    The minimum is what the method needs of a prompt (:meth:`ProfileParams.min_prompt_tokens`); the maximum
    is the model's ``max_context`` (from its config; 0 = unknown, not checked).
    """
    need = params.min_prompt_tokens()
    if length < need:
        raise click.BadParameter(
            f"{length} is shorter than the {need} tokens the parameters need ({params.min_prompt_terms()}); pass a larger length or a smaller --budget / --obs-window",
            param_hint=param_hint,
        )
    if max_context and length > max_context:
        raise click.BadParameter(f"{length} exceeds the model's maximum of {max_context} tokens",
                                 param_hint=param_hint)
