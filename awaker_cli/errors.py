"""The one exception type for bad user input: the CLI prints its message on one line and exits 2."""


class AwakerError(Exception):
    """A problem with the user's input (paths, checkpoints, options), not a bug in awaker."""
