"""Subcommands of the ``mqstore`` command (see mqstore/cli.py)."""
