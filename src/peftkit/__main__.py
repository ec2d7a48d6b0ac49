"""``python -m peftkit ...`` is the ``peftkit`` command (also under ``accelerate launch -m``)."""

import sys

from .cli import main

sys.exit(main())
