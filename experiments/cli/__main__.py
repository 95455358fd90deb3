"""`python -m skinclr.cli`: the `skinclr` command without its console script."""
from skinclr.cli.main import run

run()
