"""Launchable examples: ``python -m workbench.examples.<name>``."""
