"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class SpdError(Exception):
    """A mistake in the user's input or environment, explained in one line (no traceback)."""
