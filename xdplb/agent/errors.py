"""What the agent raises to the CLI: a request it cannot meet, or an attach that failed."""

from __future__ import annotations


class AttachError(RuntimeError):
    """Attaching failed; the message says why and what to do."""


class UsageError(ValueError):
    """The request cannot be met as asked (missing interface, foreign program...)."""
