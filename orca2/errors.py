"""The one exception type for bad user input; the CLI prints it as a single line."""


class Orca2Error(ValueError):
    """A user-facing error: its message names the file, line and field at fault."""
