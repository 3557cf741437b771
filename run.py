"""spiffy experiment runner from a checkout: `python run.py [overrides]` is `spiffy run [overrides]` (see README)."""

import sys

from spiffy.lab.runner import main

if __name__ == "__main__":
    sys.exit(main())
