"""nsbridge.net: see the module list."""
