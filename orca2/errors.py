"""The one exception type for bad user input; the CLI prints it as a single line."""


class Orca2Error(ValueError):
    """A user-facing error: its message names the file, line and field at fault."""


def where(path: object, line: int | None = None) -> str:
    """Format a location prefix such as 'tasks.jsonl:12'."""
    return f"{path}:{line}" if line is not None else str(path)
