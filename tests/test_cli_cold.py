"""Every command, started as a user starts it: a fresh interpreter (not the fork server of test_resume.py),
given something it must refuse, ends with one line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/fixedcls/last.pt"

# (how a user starts it: console script or python -m, arguments it must refuse, a word the line must hold)
COMMANDS = [
    (["fixedcls-train"], ["trainer.epoch=1"], "trainer.epochs"),
    (["fixedcls-compat"], [MISSING, MISSING], MISSING),
    (["fixedcls-compat", "train"], ["generations.protokol=cumulative"], "generations.protocol"),
    (["fixedcls-compare"], ["/nonexistent/fixedcls/multirun"], "/nonexistent/fixedcls/multirun"),
    (["fixedcls-eval"], [MISSING], MISSING),
    (["fixedcls-predict"], [MISSING, str(ROOT / "README.md")], MISSING),
    (["fixedcls-export"], [MISSING, "--out", "/nonexistent/fixedcls/export"], MISSING),
    (["fixedcls-embed"], [MISSING, "--out", "/nonexistent/fixedcls/gallery.safetensors"], MISSING),
    ([sys.executable, "-m", "fixedcls.collapse"], [MISSING], MISSING),
    ([sys.executable, "-m", "fixedcls.ufm"], ["--heads", "simplex", "--lambda-w", "-1"], "lambda"),
]


def _command(start: list[str]) -> list[str]:
    """The console script installed beside this interpreter, else its module through python -m."""
    if start[0] == sys.executable:
        return start
    script = Path(sys.executable).with_name(start[0])
    if script.exists():
        return [str(script), *start[1:]]
    module = {"fixedcls-train": "fixedcls.commands.train", "fixedcls-compat": "fixedcls.commands.compat", "fixedcls-compare": "fixedcls.commands.compare",
              "fixedcls-eval": "fixedcls.commands.evaluate", "fixedcls-predict": "fixedcls.commands.predict",
              "fixedcls-export": "fixedcls.commands.export", "fixedcls-embed": "fixedcls.commands.embed"}[start[0]]
    return [sys.executable, "-m", module, *start[1:]]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """All commands at once (each pays its own interpreter start), then their results."""
    cwd = tmp_path_factory.mktemp("cold")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    running = [subprocess.Popen(_command(start) + args, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for start, args, _ in COMMANDS]
    return [(process.wait(timeout=240), *process.communicate()) for process in running]


@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=[" ".join(Path(c[0][-1]).name.split()) + " " + " ".join(c[1][:1])
                                                           for c in COMMANDS])
def test_a_cold_command_refuses_bad_input_in_one_line(outcomes, index):
    code, out, err = outcomes[index]
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and lines, err
    assert any(COMMANDS[index][2] in line for line in lines), err
