"""Library operations behind the commands; each works without the CLI."""
