"""What stops a replay before it produces anything: one line for the user."""


class ReplayInputError(Exception):
    """The bag, the params file or a flag cannot be used; the message says why, in one line."""
