"""The one exception type for user-facing errors (bad files, bad input, unknown users)."""


class FedkbError(Exception):
    """An error the user can fix: shown as one line, never as a traceback."""
