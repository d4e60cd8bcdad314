"""`python -m fixedcls.collapse` runs the command fixedcls.commands.collapse, where every entry point lives.

Run, not imported: runpy does for this name what `python -m fixedcls.commands.collapse` does, so nothing
outside commands/ imports a command.
"""
import runpy

runpy.run_module("fixedcls.commands.collapse", run_name="__main__", alter_sys=True)
