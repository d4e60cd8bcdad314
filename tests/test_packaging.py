"""Packaging and Hydra's own command-line flags (issue 13).

The wheel carries conf/ as fixedcls/conf/, so an installed `fixedcls-train` runs from any directory; Hydra's
flags (-sc, --cfg, --info, --help) reach Hydra through both entry points, and mistyped keys still fail early.
The flag tests call the console scripts' own functions in-process (a process each would import torch nine times).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixedcls.commands import cli
from fixedcls.commands import compat
from fixedcls.commands import train
from fixedcls.config import conf_dir

REPO = Path(__file__).resolve().parents[1]
GROUPS = sorted(p.name for p in conf_dir().iterdir() if p.is_dir() and p.name != "hydra")


def run_main(entry, argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run a console script's main with argv (argv[0] names the program); its exit status, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", list(argv))
    try:
        status = entry()
    except SystemExit as stop:
        status = stop.code
    out, err = capsys.readouterr()
    return int(status or 0), out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------ Hydra's flags, both entry points

ENTRIES = {"fixedcls-train": (train.main, ["fixedcls-train"]),
           "fixedcls-compat train": (compat.main, ["fixedcls-compat", "train"])}


@pytest.mark.parametrize("command", ENTRIES)
def test_shell_completion_installs_and_completes_config_groups(command, monkeypatch, capsys):
    entry, head = ENTRIES[command]
    program = head[0]
    status, out, err = run_main(entry, head + ["-sc", "install=bash"], monkeypatch, capsys)
    assert status == 0, err
    assert f"-F hydra_bash_completion {program}" in out
    # What the installed script runs on <TAB>: `PROGRAM -sc query=bash` with the typed line in COMP_LINE.
    monkeypatch.setenv("COMP_LINE", " ".join(head + ["head=s"]))
    status, out, err = run_main(entry, [program, "-sc", "query=bash"], monkeypatch, capsys)
    assert status == 0, err
    assert out.split() == ["head=simplex"]


@pytest.mark.parametrize("command", ENTRIES)
def test_help_lists_every_config_group_with_its_options(command, monkeypatch, capsys):
    entry, head = ENTRIES[command]
    status, out, err = run_main(entry, head + ["--help"], monkeypatch, capsys)
    assert status == 0, err
    assert out.startswith("fixedcls-train: train a classifier")
    for group in GROUPS:
        options = ", ".join(sorted(p.stem for p in (conf_dir() / group).glob("*.yaml")))
        assert f"\n{group}: {options}\n" in out
    assert "--shell-completion,-sc" in out and "\nhead:\n  name: simplex\n" in out


def test_help_lists_every_other_command(monkeypatch, capsys):
    import re
    import tomllib

    status, out, err = run_main(train.main, ["fixedcls-train", "--help"], monkeypatch, capsys)
    assert status == 0, err
    scripts = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]) - {"fixedcls-train"}
    modules = {f"python -m fixedcls.{p.parent.name}" for p in (REPO / "fixedcls").glob("*/__main__.py")}
    listed = set(re.findall(r"^  (fixedcls-\S+|python -m fixedcls\.\w+) ", out.split("The other commands")[1], re.M))
    assert listed == scripts | modules and len(modules) == 2


def test_every_install_hint_has_the_readmes_form():
    """`pip install -e ".[extra]"` (or `-e .` for a dependency), as the README writes it, never another spelling."""
    import re

    readme = (REPO / "README.md").read_text()
    assert 'pip install -e ".[dev]"' in readme or '-e ".[dev]"' in readme
    hints = [(path, hint) for path in [*(REPO / "fixedcls").rglob("*.py"), *(REPO / "conf").rglob("*.yaml")]
             for hint in re.findall(r"pip install(?: +[^\s`',;)]+){1,2}", path.read_text())]
    assert hints
    odd = [(str(path.relative_to(REPO)), hint) for path, hint in hints
           if not re.fullmatch(r'pip install -e (\.|"\.\[\w+\]")', hint)]
    assert not odd, odd


def test_the_readme_installs_cpu_only_torch_before_fixedcls():
    setup = (REPO / "README.md").read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    cpu = setup.index("pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu")
    assert cpu < setup.index("pip install -e .")


def test_build_and_dist_are_ignored():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("build/lib/fixedcls/config.py", "dist/fixedcls-0.1.0-py3-none-any.whl"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0, path


@pytest.mark.parametrize("command", ENTRIES)
def test_cfg_and_info_print_without_training(command, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    entry, head = ENTRIES[command]
    status, out, err = run_main(entry, head + ["--cfg", "job", "head=dcube", "optim.lr=0.2"], monkeypatch, capsys)
    assert status == 0, err
    assert out.startswith("head:\n  name: dcube\n") and "\n  lr: 0.2\n" in out
    status, out, err = run_main(entry, head + ["--info", "searchpath"], monkeypatch, capsys)
    assert status == 0, err
    assert str(conf_dir()) in out
    assert not any(tmp_path.iterdir())  # neither made a run directory


@pytest.mark.parametrize("command", ENTRIES)
def test_a_mistyped_key_next_to_hydra_flags_still_fails_in_one_line(command, monkeypatch, capsys):
    entry, head = ENTRIES[command]
    status, out, err = run_main(entry, head + ["--cfg", "job", "trainer.epoch=3"], monkeypatch, capsys)
    assert status == 2 and out == ""
    assert "unknown config key 'trainer.epoch': did you mean trainer.epochs?" in one_line_error(err)
    status, out, err = run_main(entry, head + ["-m", "head=simplx,learned"], monkeypatch, capsys)
    assert status == 2
    assert "unknown head 'simplx'" in one_line_error(err)


def test_the_override_check_reads_the_command_line_as_hydra_does():
    # The words after -sc are completion commands, and a flag's argument is no override.
    assert cli.check_overrides(["-sc", "install=bash"]) is None
    assert cli.check_overrides(["--shell-completion", "query=bash"]) is None
    assert cli.check_overrides(["--info", "config", "--package", "head", "-c", "job"]) is None
    assert "did you mean seed" in cli.check_overrides(["--info", "config", "sede=1"])
    # An extra config folder may bring options of its own: Hydra checks the choice, keys are still checked.
    assert cli.check_overrides(["--config-dir", "/elsewhere", "head=mine"]) is None
    assert "did you mean trainer.epochs" in cli.check_overrides(["-cd", "/elsewhere", "trainer.epoch=1"])


# ------------------------------------------------------------------ the wheel

@pytest.mark.packaging
def test_the_wheel_carries_the_configs_and_runs_from_any_directory(tmp_path):
    """Build the wheel offline from a copy of the sources, install it into a folder, run it from elsewhere."""
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("fixedcls", "conf"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "PIP_NO_INDEX": "1"}
    env.pop("PYTHONPATH", None)
    pip = [sys.executable, "-m", "pip", "--quiet"]
    built = subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(tmp_path / "dist"),
                                  str(source)], env=env, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("fixedcls-*.whl")
    target = tmp_path / "site"
    installed = subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(wheel)],
                               env=env, capture_output=True, text=True, timeout=120)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    def files(root: Path, pattern: str) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob(pattern) if "__pycache__" not in p.parts}

    assert files(target / "fixedcls", "*.py") == files(REPO / "fixedcls", "*.py")
    assert files(target / "fixedcls" / "conf", "*.yaml") == files(REPO / "conf", "*.yaml")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**env, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    where = subprocess.run([sys.executable, "-c", "import fixedcls.config as c; print(c.__file__); print(c.conf_dir())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert where.stdout.split() == [str(target / "fixedcls" / "config.py"), str(target / "fixedcls" / "conf")]
    script = target / "bin" / "fixedcls-train"  # the console script pip wrote, run as a user would
    shown = subprocess.run([str(script), "--cfg", "job", "head=orthoplex", "data=synthetic"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("head:\n  name: orthoplex\n") and "\n  name: synthetic\n" in shown.stdout
    assert not any(elsewhere.iterdir())
