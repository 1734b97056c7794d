"""The command line: argument parsing and dispatch to the library, nothing else.

* :mod:`.main` — ``nsbridge`` and its commands (the parser also feeds the man page).
* :mod:`.compat` — ``netns_tcp_bridge``/``netns-tcp-bridge``: the original's command line.
* :mod:`.slirp4netns` — ``nsbridge-slirp4netns``: slirp4netns's command line, for
  rootlesskit and podman.
* :mod:`.demo` — ``nsbridge demo``: a real forward into a throwaway namespace.
* :mod:`.doctor` — ``nsbridge doctor``: what this machine lets nsbridge do.

The library never imports this package (tests/test_layout.py checks).
"""
