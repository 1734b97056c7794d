"""nsbridge.forward: see the module list."""
