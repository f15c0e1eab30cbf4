"""The one error type a user sees: a problem they can fix (bad path, bad flag, wrong checkpoint).

Scripts print it as one line, ``error: ...``, and exit with status 2 (see cli.run)."""


class UserError(Exception):
    """A problem the user can fix. Printed as one line, exit 2."""
