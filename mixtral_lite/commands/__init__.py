"""Subcommands of the mixtral-lite CLI, one module each."""
