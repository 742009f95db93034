"""Errors a user can fix: each becomes one line on stderr and exit status 2."""


class UsageError(Exception):
    """A bad flag, file or value, caught before any work starts."""


class DataError(ValueError):
    """A data file or data parameter a user can fix."""
