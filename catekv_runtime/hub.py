"""Profiles on the Hugging Face Hub, for loading: what reads as a repo id, and the download of a repo's profile.

huggingface_hub is imported only when a profile is downloaded, so that the runtime imports with torch and
safetensors alone. (Pushing a profile, with its model card, is the profiler's: ``catekv_profiler.hub``.)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ProfileError

PROFILE_FILENAME = "profile.safetensors"  # docs/profile-format.md: the name looked up in a Hub repo
# A Hub repo id with its namespace, "org/name" (huggingface_hub's naming rules, less "--" and ".."), told apart
# here without huggingface_hub, which may not be installed.
_HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_hub_repo_id(text: str) -> bool:
    """True if ``text`` has the form of a Hugging Face Hub repo id with its namespace ("org/name")."""
    return bool(_HUB_REPO_ID.match(text)) and "--" not in text and ".." not in text


def is_hub_id(text: str) -> bool:
    """True if ``text`` reads as a Hugging Face Hub repo id ("org/name"), not as a local path or file."""
    return (
        is_hub_repo_id(text)
        and not text.lower().endswith((".gguf", ".safetensors"))
        and not os.path.exists(text)
    )


def download_profile(repo_id: str, revision: str | None) -> Path:
    """The local path of the :data:`PROFILE_FILENAME` of Hub repo ``repo_id`` at ``revision`` (default: main),
    through huggingface_hub's cache (so it works offline once fetched); :class:`ProfileError` saying why not."""
    try:
        from huggingface_hub import constants as hub_constants
        from huggingface_hub import errors as hub_errors
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ProfileError("loading a profile from the Hub needs huggingface_hub: pip install huggingface_hub") from None
    where = f"Hub repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        return Path(hf_hub_download(repo_id, PROFILE_FILENAME, revision=revision))
    except hub_errors.LocalEntryNotFoundError:  # no answer from the Hub, and not in the cache
        if hub_constants.HF_HUB_OFFLINE:
            message = (
                f"offline (HF_HUB_OFFLINE is set) and {PROFILE_FILENAME} of {where} is not in the huggingface_hub cache "
                f"({hub_constants.HF_HUB_CACHE}); load it once while online, or unset HF_HUB_OFFLINE"
            )
        else:
            message = (
                f"could not reach the Hub ({hub_constants.ENDPOINT}) and {PROFILE_FILENAME} of {where} is not in the "
                "huggingface_hub cache; check the connection (or HF_ENDPOINT)"
            )
        raise ProfileError(message) from None
    except hub_errors.RevisionNotFoundError:
        raise ProfileError(f"revision {revision!r} not found in the Hub repo {repo_id!r}") from None
    except hub_errors.RepositoryNotFoundError:  # also a gated repo (GatedRepoError is a subclass)
        raise ProfileError(
            f"Hub repo {repo_id!r} not found, or it is private or gated and this token has no access "
            "(log in with `hf auth login` or set HF_TOKEN)"
        ) from None
    except hub_errors.EntryNotFoundError:
        raise ProfileError(
            f"{where} has no {PROFILE_FILENAME}; a CateKV profile repo holds it at the top level "
            "(`catekv-profile push PROFILE REPO_ID` puts it there)"
        ) from None
    except Exception as e:  # huggingface_hub raises many types; all mean "could not get the file"
        raise ProfileError(f"could not get {PROFILE_FILENAME} from the {where}: {e}") from None


__all__ = ["PROFILE_FILENAME", "download_profile", "is_hub_id", "is_hub_repo_id"]
