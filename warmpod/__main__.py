"""`python -m warmpod`: the same as the `warmpod` command."""

import sys

from warmpod.cli import main

sys.exit(main())
