"""Every entry point of fixedcls: the console scripts (train, compat, compare, evaluate, predict, export,
embed), the `python -m` commands (collapse, ufm), the Hydra sweep callbacks (sweep) and what they share (cli).

Commands sit above the library: nothing outside this package imports it, and no command imports another.
"""
