"""The `skinclr` command line: parsing, one clear line per expected error, the quickstart, cluster submission."""
