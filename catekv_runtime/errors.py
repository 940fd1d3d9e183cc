"""The runtime's one error type, in a module of its own so that every other module can import it."""

from __future__ import annotations


class ProfileError(ValueError):
    """A profile is missing, corrupted, inconsistent, or does not fit the model it is applied to; or a
    parameter is out of range."""


__all__ = ["ProfileError"]
