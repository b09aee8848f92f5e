"""The one error type users see.

A `FastftError` is bad input or an unmet requirement that the user can fix. The CLI
prints its message as one paragraph and exits with code 2, without a traceback.
Anything else is a bug in fastft (or a library) and keeps its traceback.
"""


class FastftError(Exception):
    """Bad input or a missing requirement, explained in words the user can act on."""

    exit_code = 2
