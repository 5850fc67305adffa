"""Command-line tools: ``python -m longtail.tools.<name> --help``."""
