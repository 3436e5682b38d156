"""``python -m runtime.serve --model NAME=DIR``: see ``python -m runtime.serve --help``."""

import sys

from .cli import main

sys.exit(main())
