"""``python -m nsbridge`` is the ``nsbridge`` command."""

import sys

from .cli import main

sys.exit(main())
