"""Errors a user can cause. The CLI prints them as one line (no traceback) and exits with 2."""


class UserError(Exception):
    """Bad input from the user: a file, key, flag or value. The message names it, expected vs got."""
