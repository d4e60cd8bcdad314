"""Every entry point of fixedcls: the console scripts (train, compat, compare, evaluate, predict, export,
embed), the `python -m` commands (collapse, ufm), the Hydra sweep callbacks (sweep) and what they share (cli).

Commands sit above the library: nothing outside this package imports it, and no command imports another.
"""
import os

# Runs that share a machine share its cores.  torch's OpenMP threads (libgomp) spin up to 300,000 rounds at
# every barrier before they sleep; with two runs on one machine each spins away the core the other needs.
# Measured on this project's 2-core machine (3-epoch default runs, docs/benchmarks.md): two runs at once took
# 1.46 and 3.05 times as long as one after the other with libgomp's spin count, 0.77 with 1,000 spins, and a
# lone run's epoch was no slower (1.95-2.03 s against 2.18-2.28 s; OMP_WAIT_POLICY=PASSIVE cost it 20%).
# It is set here, before any command imports torch, because libgomp reads it once when it loads; it changes
# how threads wait, never how many there are, so a run's numbers do not depend on how busy the machine is.
# A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
OPENMP_SPINCOUNT = "1000"
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPINCOUNT)
