"""One module per command; importing them registers the commands on the app."""
from . import info, tiny, upcycle  # noqa: F401
