"""``python -m mpstream``: the same as the ``mpstream`` command."""

import sys

from .cli import main

sys.exit(main())
