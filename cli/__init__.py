"""The `edgezo` command line (installed as the package edgezo.cli)."""
