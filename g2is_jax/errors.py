"""The one exception type for errors a user can cause.

The CLI prints a `G2ISError` without a traceback and exits with status 2; anything else is a bug
and keeps its traceback. Messages name the file/record and, where there is one, the fix.
"""


class G2ISError(Exception):
    """A user error: bad input file, bad flag, missing model, mismatched features."""
