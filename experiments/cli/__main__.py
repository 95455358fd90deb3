"""`python -m skinclr.cli`: the `skinclr` command without its console script."""
import sys

from skinclr.cli.main import main

sys.exit(main())
