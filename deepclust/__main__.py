"""``python -m deepclust``: the same as the ``deepclust`` command."""

import sys

from .cli import main

sys.exit(main())
