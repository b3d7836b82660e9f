"""``python -m linfusion.app``: the same as ``linfusion demo``."""

import sys

from .cli import main

sys.exit(main())
