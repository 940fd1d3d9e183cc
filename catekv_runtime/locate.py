"""Where a profile named by the user is: a local file, a profile shipped with catekv, or a Hub repo.

The shipped profiles are the data package ``catekv_profiles``, found through importlib.resources the same way
in a source checkout, an editable install and an installed wheel.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

from .errors import ProfileError
from .hub import download_profile, is_hub_id


def _shipped_profiles_folder() -> Path:
    # A regular package on disk (pip installs wheels unpacked), so its Traversable is a pathlib.Path.
    return Path(str(importlib.resources.files("catekv_profiles")))


def list_profiles() -> list[str]:
    """Short names of the profiles shipped with catekv (``catekv_profiles/``), for ``load_profile(name)``."""
    return sorted(p.stem for p in _shipped_profiles_folder().glob("*.safetensors"))


def locate_profile(path: str | os.PathLike[str], revision: str | None = None) -> Path:
    """The local file of ``path``: itself if it is a file, a shipped profile by short name, else a Hub repo id
    (``"org/name"`` or ``"org/name@revision"``) downloaded (:func:`~catekv_runtime.hub.download_profile`).
    Raises :class:`ProfileError` naming what is wrong."""
    local = Path(path)
    if local.is_file():
        return local
    text = str(path)
    if local.is_dir():
        raise ProfileError(f"{text!r} is a directory, not a profile file; pass the .safetensors file")
    shipped = _shipped_profiles_folder() / f"{text}.safetensors"
    if "/" not in text and shipped.is_file():
        return shipped
    repo_id, at, at_revision = text.partition("@")  # "org/name@rev"; the revision may hold "/" (refs/pr/1)
    # "profiles/llama" with a profiles/ folder here is a missing local file, not a repo id.
    looks_like_repo = is_hub_id(repo_id) and not Path(repo_id).parent.is_dir()
    if not looks_like_repo:
        names = ", ".join(list_profiles()) or "none"
        raise ProfileError(f"profile file {text!r} not found (shipped profiles by short name: {names})")
    if at and not at_revision:
        raise ProfileError(f"{text!r}: empty revision after '@'; write 'org/name@branch-tag-or-commit'")
    if at_revision and revision and at_revision != revision:
        raise ProfileError(f"{text!r} names revision {at_revision!r} but revision={revision!r} was also passed")
    return download_profile(repo_id, revision or at_revision or None)


__all__ = ["list_profiles", "locate_profile"]
