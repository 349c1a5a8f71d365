"""``python -m fedmarket`` = the ``fedmarket`` command (for machines where the entry point is not installed)."""

import sys

from fedmarket.cli import main

sys.exit(main())
