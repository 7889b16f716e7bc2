"""Command-line interface: thin wrappers over the importable API."""
