"""Errors that name the input field at fault, so every layer can report it."""


class InputError(ValueError):
    """A request or observation field is unusable. ``field`` is a dotted path."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class BackendStartupError(ValueError):
    """A backend refuses to start with the given settings (bad option, missing
    hardware or package, unusable model). The message says why and how to fix it;
    callers print it as it is, without a traceback."""
