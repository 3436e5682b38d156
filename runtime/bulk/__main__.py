"""``python -m runtime.bulk``."""

import sys

from .cli import main

sys.exit(main())
