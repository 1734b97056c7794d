"""``python -m nsbridge`` is the ``nsbridge`` command."""

import sys

from nsbridge.cli.main import main

sys.exit(main())
