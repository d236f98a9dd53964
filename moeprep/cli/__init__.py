"""The ``moeprep`` command line (typer)."""

from moeprep.cli.app import app, main

__all__ = ["app", "main"]
