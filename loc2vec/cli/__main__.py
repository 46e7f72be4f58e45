"""`python -m loc2vec.cli` (torchrun starts DDP workers this way)."""

import sys

from loc2vec.cli.main import main

sys.exit(main())
