"""Errors meant for the person at the keyboard: one clear line, no traceback."""


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, wrong data spec).

    The CLI prints ``error: <message>`` and exits with status 2.
    """


def permission_denied(path: object) -> str:
    """The line for a file this process may not read: said as such, not as a format problem
    (a model bind-mounted into a container that runs as another user is the usual case)."""
    return f"permission denied: {path} (make it readable by the user this runs as)"
