"""`python -m rlhf_fast <stage> ...`: the same as the `rlhf-fast` command (see rlhf_fast.cli)."""
import sys

from .cli import main

sys.exit(main())
