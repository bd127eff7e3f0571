"""Surfaces run from a shell: the CLI, bench and the workflow commands."""
