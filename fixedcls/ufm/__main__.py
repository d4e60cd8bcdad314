"""`python -m fixedcls.ufm` runs the command fixedcls.commands.ufm, where every entry point lives.

Run, not imported: runpy does for this name what `python -m fixedcls.commands.ufm` does, so nothing
outside commands/ imports a command.
"""
import runpy

runpy.run_module("fixedcls.commands.ufm", run_name="__main__", alter_sys=True)
