"""`python -m mmn_fast ...` is the `mmn` command (torchrun launches it this way)."""
import sys

from .cli.main import main

sys.exit(main())
