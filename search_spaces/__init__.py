"""The shipped search spaces (YAML), installed as package data `skinclr.search_spaces`."""
