"""``python -m linfusion`` runs the CLI (also what ``torchrun -m linfusion`` uses)."""

import sys

from .cli import main

sys.exit(main())
