"""The error users can fix: bad data, flags, files or launch commands. The CLI prints its message (and hint) without
a traceback; any other exception is a bug and keeps its traceback."""


class InputError(ValueError):
    """A problem with what the user gave (a file, a column, a row, a flag, a launch command), said in one message."""
