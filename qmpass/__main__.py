"""``python -m qmpass``."""

import sys

from qmpass.cli import main

sys.exit(main())
