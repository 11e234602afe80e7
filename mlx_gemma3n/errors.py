"""The one exception type for problems a user can fix (bad files, bad arguments, bad prompts)."""


class Gemma3nError(ValueError):
    """Raised with a message that names the problem; the CLI prints it as one line."""
