"""nsbridge: connect Linux network namespaces.

The library has the same powers as the command line; start with :class:`Bridge`.
"""

__version__ = "0.1.0"

from .bridge import Bridge
from .errors import UserError
from .forward import (
    ConnectAddress,
    ForwardSpec,
    ListenAddress,
    ListenSocket,
    Preaccepted,
    Preconnected,
)
from .netns import Netns

__all__ = [
    "Bridge",
    "ConnectAddress",
    "ForwardSpec",
    "ListenAddress",
    "ListenSocket",
    "Netns",
    "Preaccepted",
    "Preconnected",
    "UserError",
    "__version__",
]
