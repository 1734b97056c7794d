"""The data engines: the event loop and the TCP relay."""
