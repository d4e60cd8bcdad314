"""The examples of README.md and docs/ run as written (issue 27): a document nobody executes drifts.

Every fenced block whose language is bash, sh, console or python is run, in the order of its document, in
a fresh directory per document that holds what a short default run leaves behind (`fixedcls-train
trainer.epochs=2`: its `outputs/` and `checkpoints/`), as a reader who follows the page would, unless the
line right before the fence says why not:

    <!-- not run: needs a GPU -->                   the block is skipped, and the reason must be given
    <!-- run from the repository root -->           the block runs in a copy-free checkout: the repository

bash blocks run as one script with `set -eo pipefail`. In console blocks, the lines after `$ ` are the
commands (a trailing backslash continues one); a command whose shown output ends in `(exit status N)` must
exit with N, one whose output holds `error:` must fail, every other one must succeed. python blocks run as a script. A fence without a language that holds a
command line is refused, so no example can slip past unlabelled. Relative links in README.md and docs/
must name files of the repository.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = ("bash", "sh", "console", "python")
SKIP = re.compile(r"^<!-- not run: (?P<why>.*\S.*) -->$")
FROM_REPO = "<!-- run from the repository root -->"
EXIT_LINE = re.compile(r"^\(exit status (\d+)\)$")  # a transcript's way of showing a command's status
COMMAND_LINE = re.compile(r"^(\$ |fixedcls-|python -m fixedcls|pip install|torchrun )")
TIMEOUT_S = 300  # per block; the examples take well under a minute on a quiet 2-core machine, CI machines can be slow


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    before: str  # the line right before the fence

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    found, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\S*)", lines[i])
        if fence:
            start, language = i, fence.group(2).lower()
            i += 1
            body = []
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i][len(fence.group(1)):])
                i += 1
            found.append(Block(path, start + 1, language, "\n".join(body) + "\n", lines[start - 1].strip() if start else ""))
        i += 1
    return found


ALL = [block for path in DOCUMENTS for block in blocks(path)]
RUNNABLE = [b for b in ALL if b.language in RUN]


def console_script(code: str) -> str:
    """A console transcript as a bash script: each `$ ` command, with its shown outcome enforced."""
    commands, current, outputs = [], None, []
    for line in code.splitlines():
        if current is not None and current.endswith("\\"):
            current = current + "\n" + line
        elif line.startswith("$ "):
            if current is not None:
                commands.append((current, outputs))
            current, outputs = line[2:], []
        elif current is not None:
            outputs.append(line)
    if current is not None:
        commands.append((current, outputs))
    script = []
    for command, shown in commands:
        declared = [int(m.group(1)) for line in shown for m in [EXIT_LINE.match(line.strip())] if m]
        if declared:
            check = f"[ $status -eq {declared[0]} ]"
        elif any("error:" in line for line in shown):
            check = "[ $status -ne 0 ]"
        else:
            check = "[ $status -eq 0 ]"
        message = shlex.quote(f"the exit status does not match the transcript: {command[:80]}")
        script.append(f"set +e\n{command}\nstatus=$?\nset -e\n{check} || {{ echo {message} \"(got $status)\" >&2; exit 1; }}")
    return "set -eo pipefail\n" + "\n".join(script) + "\n"


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    """What the examples build on: the default run, two epochs, in a folder of its own."""
    where = tmp_path_factory.mktemp("short_run")
    done = subprocess.run([str(Path(sys.executable).parent / "fixedcls-train"), "trainer.epochs=2"], cwd=where,
                          env=environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return where


def environment() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(CUDA_VISIBLE_DEVICES="", MPLBACKEND="Agg", WANDB_MODE="offline", WANDB_SILENT="true",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def reader(short_run, tmp_path_factory):
    """The folder of each document's reader: a fresh one per document, made on its first example."""
    folders: dict[Path, Path] = {}

    def folder_for(document: Path) -> Path:
        if document not in folders:
            folders[document] = tmp_path_factory.mktemp(document.stem)
            for name in ("outputs", "checkpoints"):
                shutil.copytree(short_run / name, folders[document] / name, copy_function=os.link)
        return folders[document]

    return folder_for


@pytest.mark.parametrize("block", [b for b in RUNNABLE if not SKIP.match(b.before)], ids=lambda b: b.name)
def test_the_example_runs_as_written(block, reader, tmp_path):
    where = ROOT if block.before == FROM_REPO else reader(block.path)
    if block.language == "python":
        script = tmp_path / "example.py"
        script.write_text(block.code)
        command = [sys.executable, str(script)]
    else:
        script = tmp_path / "example.sh"
        script.write_text(console_script(block.code) if block.language == "console" else "set -eo pipefail\n" + block.code)
        command = ["bash", str(script)]
    done = subprocess.run(command, cwd=where, env=environment(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, (f"{block.name} failed (exit {done.returncode}):\n{block.code}\n--- stdout:\n"
                                  f"{done.stdout[-3000:]}\n--- stderr:\n{done.stderr[-3000:]}")


def test_every_skipped_example_says_why():
    """`<!-- not run -->` without a reason, or a command block without a language, would hide an example."""
    problems = []
    for block in ALL:
        if block.before.startswith("<!-- not run") and not SKIP.match(block.before):
            problems.append(f"{block.name}: give the reason, <!-- not run: REASON -->")
        if block.language == "" and any(COMMAND_LINE.match(line.strip()) for line in block.code.splitlines()):
            problems.append(f"{block.name}: a command line in a block without a language: label it bash, console or python")
    assert not problems, "\n".join(problems)


def test_relative_links_name_files_of_the_repository():
    broken = []
    for path in DOCUMENTS:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            if re.match(r"[a-z]+:", target):
                broken.append(f"{path.relative_to(ROOT)}: {target} (documentation links only inside the repository)")
                continue
            resolved = (path.parent / target).resolve()
            if not resolved.exists() or ROOT not in resolved.parents:
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "\n".join(broken)


def test_the_readme_fits_on_a_few_screens():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300
