"""`python -m loc2vec.cli` (torchrun starts DDP workers this way)."""

import sys

from loc2vec.cli.main import main

sys.exit(main())  # argv None: re-executed under tcmalloc at most once (LD_PRELOAD is then set)
