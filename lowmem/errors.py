"""One exception type for problems the user can fix; the CLI prints it as one line and exits non-zero."""


class UserError(Exception):
    """A bad flag, file or value: the message names the problem and the fix."""
