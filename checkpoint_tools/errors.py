"""The one exception the converters raise for bad input; the CLI prints its message and exits with status 2."""


class ConversionError(Exception):
    """Bad input or output location, explained in one sentence that names the file, tensor or key."""
