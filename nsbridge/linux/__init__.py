"""nsbridge.linux: see the module list."""
