"""`python -m llmpipe_cli ...`: the `llmpipe` command from a checkout."""

import sys

from llmpipe_cli.main import main

sys.exit(main())
