"""User-facing errors: the CLI prints them as one line and exits non-zero (no traceback)."""


class UserError(Exception):
    """Bad input from the user (arguments, files, sizes): reported as one clear line."""
