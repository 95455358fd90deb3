"""The shipped run, sweep and study configs (YAML), installed as package data `skinclr.configs`."""
