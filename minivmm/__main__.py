"""`python -m minivmm`: the same command as `minivmm` (minivmm/_entry.py)."""
import sys

from ._entry import main

sys.exit(main())
