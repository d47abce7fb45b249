"""The ``xdplb`` command line (``main`` is the entry point)."""

from xdplb.cli.main import main

__all__ = ["main"]
