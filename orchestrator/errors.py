"""Errors the command reports as one line (exit 1) instead of a traceback."""


class UsageError(ValueError):
    """A request that cannot be carried out as asked; the message says why and what would work."""
