"""`python -m minivmm`: the same command as `minivmm` (minivmm/cli.py)."""
import sys

from .cli import main

sys.exit(main())
