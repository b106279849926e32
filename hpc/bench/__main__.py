"""`python -m hpc.bench`: the step benchmark across strategies (hpc.bench.strategies), its shortest name."""

from __future__ import annotations

import sys

from hpc.bench.strategies import main

if __name__ == "__main__":
    sys.exit(main())
