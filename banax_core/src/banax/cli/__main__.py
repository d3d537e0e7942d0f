"""`python -m banax.cli`: the same as the `banax` command."""

import sys

from . import main

sys.exit(main())
