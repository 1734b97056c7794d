"""nsbridge.usernet.inside: see the module list."""
