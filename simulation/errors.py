"""User-facing errors: one line that names the problem and the fix."""


class UsageError(Exception):
    """Bad input from the user. Command-line entry points print it on one line and exit with code 2."""

    exit_code = 2

    def __init__(self, message: str):
        one_line = " ".join(str(message).split())
        super().__init__(one_line)
