"""nsbridge.cli: see the module list."""
