"""Errors meant for the person at the keyboard: one clear line, no traceback."""


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, wrong data spec).

    The CLI prints ``error: <message>`` and exits with status 2.
    """
