"""The one exception type users see.

Library code raises `LdmError` with a message that says what is wrong, where, and what to do;
`cli.main` prints it once, as one line, and exits with its code. Anything else is a bug and keeps
its traceback.
"""

USAGE = 2  # bad input or bad usage: the user can fix the command
RUNTIME = 1  # the command was fine but the work failed (out of memory, disk, ...)


class LdmError(Exception):
    def __init__(self, message: str, exit_code: int = USAGE):
        super().__init__(message)
        self.exit_code = exit_code


def check(condition: bool, message: str, exit_code: int = USAGE) -> None:
    """Raise `LdmError(message)` unless `condition` holds."""
    if not condition:
        raise LdmError(message, exit_code)
