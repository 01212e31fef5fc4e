"""The error type every stage raises for bad input; the CLI prints it as one `error:` line."""


class InputError(ValueError):
    """Bad input data, with the file that caused it in the message."""
