"""The one exception type for errors a user can cause.

The CLI prints a `G2ISError` without a traceback and exits with status 2; anything else is a bug
and keeps its traceback. Messages name the file/record and, where there is one, the fix. Library
messages name Python parameters; `param` carries that name so a front end (the CLI, a config
file) can add the flag or key it is set by.
"""


class G2ISError(Exception):
    """A user error: bad input file, bad parameter, missing model, mismatched features."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param
