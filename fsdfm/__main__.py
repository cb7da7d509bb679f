"""`python -m fsdfm`: the fsdfm command (see fsdfm/cli.py)."""

import sys

from fsdfm.cli import main

sys.exit(main())
