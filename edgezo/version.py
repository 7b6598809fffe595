"""edgezo's version, read by pyproject.toml and written into every run's files."""

__version__ = "0.1.0"
