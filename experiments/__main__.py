"""python -m experiments CLAIM|all|premise|render [flags]: see experiments/__init__.py and --help."""

import sys

from experiments.cli import main

sys.exit(main())
