"""The Hydra callback that checks a run's folder before Hydra writes into it (conf/config.yaml
`hydra.callbacks.run_folder`), for `fixedcls-train` and `fixedcls-compat train`.

Hydra creates the run folder and writes `.hydra/*.yaml` and `<job>.log` itself, before the task function
starts, with plain `open()`: in a reused folder (a fixed `hydra.run.dir` or `hydra.sweep.dir`) a symbolic link
planted under one of those names would send the write into whatever file it names. And a folder that cannot
be created ends in Hydra's traceback. `on_run_start` and `on_multirun_start` run before either: a folder that
cannot be created, or that holds such a link, ends in one line and exit status 2, and nothing is written.

A command-layer module (Hydra loads it from conf/); the library never imports it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterator, NoReturn

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..escaping import terminal
from .cli import EXIT_USAGE, config_error

# Files of a job folder written by open(), which follows a link, besides Hydra's `<job name>.log`: the plots
# matplotlib saves (summary.json and metrics.csv are replaced atomically, metrics.jsonl is opened O_NOFOLLOW).
PLOTS = ("collapse.png", "compat.png")


class GuardRunFolder(Callback):
    """Refuses, in one line, a run or sweep folder that cannot be created or that holds a link where Hydra or
    fixedcls would write a file."""

    def on_run_start(self, config, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir", depth=0)

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        # Job folders are <sweep dir>/<subdir>: the default subdir is the job number, one level down.
        self._check(config, "hydra.sweep.dir", depth=1, top=("multirun.yaml",))

    def _check(self, config, key: str, *, depth: int, top: tuple[str, ...] = ()) -> None:
        try:
            folder, output_subdir = Path(str(OmegaConf.select(config, key))), config.hydra.output_subdir
        except OmegaConfBaseException as error:  # e.g. seed=${oops}: the run name in the folder cannot be resolved
            _refuse(f"{key} cannot be resolved: {config_error(error)}")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            _refuse(f"{key}={terminal(folder)} cannot be created ({error.strerror or error}): choose a folder "
                    f"you can write")
        if not folder.is_dir():
            _refuse(f"{key}={terminal(folder)} is not a folder: choose a folder you can write")
        written = (f"{config.hydra.job.name}.log", *PLOTS)
        linked = next(_linked_files(folder, output_subdir, written, depth, top), None)
        if linked is not None:
            _refuse(f"{key}={terminal(folder)} holds a symbolic link at {terminal(linked)} (to "
                    f"{terminal(os.readlink(linked))}), where the run would write a file of its own through it: "
                    f"remove the link, or choose another {key}")


def _linked_files(folder: Path, output_subdir, written: tuple[str, ...], depth: int,
                  top: tuple[str, ...]) -> Iterator[Path]:
    """The symbolic links among the names a job writes (`written`, and Hydra's config files in `output_subdir`)
    in `folder` and in its sub-folders down to `depth`."""
    for name in top:
        if (folder / name).is_symlink():
            yield folder / name
    level, folders = [folder], [folder]
    for _ in range(depth):
        level = [child for parent in level for child in sorted(parent.iterdir())
                 if child.is_dir() and not child.is_symlink() and child.name != str(output_subdir)]
        folders += level
    for job in folders:
        if output_subdir is not None:
            hydra_files = job / str(output_subdir)
            if hydra_files.is_symlink():
                yield hydra_files
            for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
                if (hydra_files / name).is_symlink():
                    yield hydra_files / name
        yield from (job / name for name in written if (job / name).is_symlink())


def _refuse(message: str) -> NoReturn:
    # SystemExit, not an exception: Hydra turns an exception of a callback into a warning and runs on.
    print(f"fixedcls: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)
