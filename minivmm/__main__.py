"""`python -m minivmm`: the same command as `minivmm` (minivmm/_entry.py). Not a kernel ABI."""
import sys

from ._entry import main

sys.exit(main())
