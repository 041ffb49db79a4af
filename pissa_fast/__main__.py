"""`python -m pissa_fast ...` is `pissa-fast ...` (and so `torchrun -m pissa_fast ...` works)."""
import sys

from .cli import main

sys.exit(main())
