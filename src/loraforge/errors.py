"""Errors a user can cause. The CLI prints them as one line (no traceback) and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input (recipe, data, paths, hardware choice) with a message saying what to do."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
