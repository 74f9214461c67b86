"""Error types shared by every job: the line between a user's mistake and a bug.

A :class:`UserError` is something the user can fix (a bad path, an unknown config key, a wrong catalog key). The CLI prints
its message as one line and exits with status 2, never with a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["ConfigError", "UserError"]


class UserError(Exception):
    """A mistake the user can fix. The message must be one self-contained line that says what to change."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration value is unknown, mistyped or out of range. The message names the dotted key."""
