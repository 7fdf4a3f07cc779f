"""Errors a user can cause. The CLI prints them as one line (no traceback) and exits with 2.

``UserError`` is a ``ValueError`` (and ``UserTypeError`` also a ``TypeError``), so a Python caller
catches them as the built-in kinds. A message about a Python argument names the parameter
(``temperature: ...``) and sets ``param``; the CLI then shows the flag instead (``--temperature: ...``).
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: a file, key, flag or value. The message names it, expected vs got."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param  # the Python parameter the message starts with, if any

    def for_flag(self) -> str:
        """The message with its leading parameter name written as the command-line flag."""
        text = str(self)
        if self.param and text.startswith(f"{self.param}:"):
            return f"--{self.param.replace('_', '-')}{text[len(self.param) :]}"
        return text


class UserTypeError(UserError, TypeError):
    """An argument of the wrong type (``stop=5``)."""


class ConfigError(UserError):
    """A configuration value or file that cannot describe a model (re-exported by ``config``)."""


class RunError(RuntimeError):
    """A run that failed for a reason outside the user's input (a torchrun peer that died or stopped
    answering). The CLI prints it as one line and exits with 1 (``exit_now``: at once, without the
    interpreter's teardown)."""

    def __init__(self, message: str, *, exit_now: bool = False) -> None:
        super().__init__(message)
        self.exit_now = exit_now
