"""nsbridge.usernet.proto: see the module list."""
