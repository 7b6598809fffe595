"""The `edgezo` command line: this folder installs as the package edgezo.cli
(pyproject.toml), so its modules import each other relatively."""
