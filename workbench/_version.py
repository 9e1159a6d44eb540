"""The package version, in one place: ``workbench.__version__`` and the wheel's metadata
(``[tool.hatch.version]`` in pyproject.toml) both read it."""

__version__ = "0.1.0"
