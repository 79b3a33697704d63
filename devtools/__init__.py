"""Tools for developing this project, shared by tests/, bench/ and scripts/; not installed."""
