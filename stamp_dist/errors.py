"""User-facing errors: the CLI prints them without a traceback and exits non-zero."""


class StampError(Exception):
    """A problem with the user's input: the message names what is wrong and how to fix it."""
