"""One exception type for bad input: the CLI prints its message on one line, without a traceback."""


class MMNError(Exception):
    """Bad input or an unsupported request. The message says what was wrong and what to do."""
