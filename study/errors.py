"""Errors a user can fix: each becomes one line on stderr and exit status 2; and a tracking
store that stopped answering mid-command: one line and exit status 75 (try again later)."""

EXIT_STORE_DOWN = 75   # sysexits' EX_TEMPFAIL


class UsageError(Exception):
    """A bad flag, file or value, caught before any work starts."""


class DataError(ValueError):
    """A data file or data parameter a user can fix."""


class StoreDown(Exception):
    """The tracking store failed in the middle of a command that reads or writes it at length
    (export, import): what it left is said in the message; running the command again is safe."""
