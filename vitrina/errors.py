"""Errors that are the user's to fix: the CLI prints them as one line, never as a traceback."""


class UserError(Exception):
    """Bad input or a missing prerequisite. The message names the file or field and says what to do."""
