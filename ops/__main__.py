"""`python -m ops` is the `inferq` command."""

import sys

from ops.cli import main

sys.exit(main())
