"""nsbridge.usernet.host: see the module list."""
