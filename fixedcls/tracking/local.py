"""Trackers without a service: TensorBoard event files and CSV tables in the run directory."""
from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path
from typing import Callable, Optional

from ..escaping import csv_cell, markdown_row
from .base import Tracker, TrackerWarning, warn_once


def _scalars(row: dict) -> dict[str, float]:
    out = {}
    for key, value in row.items():
        if hasattr(value, "item"):
            try:
                value = value.item()
            except (ValueError, RuntimeError):
                continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


def _markdown(columns: list, rows: list[list]) -> str:
    lines = [markdown_row(columns), "|" + "---|" * len(columns)]
    lines += [markdown_row("" if v is None else f"{v:.4g}" if isinstance(v, float) else v for v in row) for row in rows]
    return "\n".join(lines)


class TensorboardTracker(Tracker):
    """TensorBoard (torch.utils.tensorboard): every numeric key of each epoch row as a scalar at step = epoch,
    collapse.png as an image, the summary and the tables as text. Event files go to `logger.tensorboard_dir`
    (default <run dir>/tensorboard); `tensorboard --logdir outputs` shows every run."""

    def __init__(self, cfg, *, run_dir: Path, resolved_config: dict):
        self.directory = Path(cfg.get("tensorboard_dir") or Path(run_dir) / "tensorboard")
        self.writer = None
        self._purge_step: Optional[int] = None
        self._last_epoch = 0
        self._broken = False
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as error:  # tensorboard is an extra: pip install -e ".[tensorboard]"
            warnings.warn(f"logger=tensorboard but TensorBoard cannot be imported ({error}): "
                          '`pip install -e ".[tensorboard]"`; training goes on without it',
                          TrackerWarning)
            return
        self._writer_class = SummaryWriter
        self._config_text = f"```\n{_config_yaml(resolved_config)}\n```"
        self.active = True

    def _write(self, what: str, fn: Callable[..., None]) -> None:
        if not self.active or self._broken:
            return
        try:
            if self.writer is None:
                # purge_step: a resumed run drops the events a crashed earlier part wrote after its checkpoint.
                self.writer = self._writer_class(log_dir=str(self.directory), purge_step=self._purge_step)
                self.writer.add_text("config", self._config_text, 0)
            fn(self.writer)
        except Exception as error:
            warn_once(self, what, error, "TensorBoard")

    def resume(self, history: list[dict]) -> None:
        if history:
            self._purge_step = int(history[-1].get("epoch", len(history))) + 1

    def log_epoch(self, row: dict) -> None:
        epoch = int(row.get("epoch", self._last_epoch + 1))
        self._last_epoch = epoch

        def write(writer) -> None:
            for key, value in _scalars(row).items():
                if key != "epoch":
                    writer.add_scalar(key, value, epoch)
            writer.flush()

        self._write("add_scalar", write)

    def log_summary(self, summary: dict) -> None:
        rows = [[k, v] for k, v in summary.items() if v is not None and not isinstance(v, (dict, list))]
        self._write("summary", lambda w: w.add_text("summary", _markdown(["key", "value"], rows), self._last_epoch))

    def log_image(self, key: str, path: Path) -> None:
        def write(writer) -> None:
            from matplotlib.image import imread

            writer.add_image(key, imread(str(path))[..., :3], self._last_epoch, dataformats="HWC")

        self._write("add_image", write)

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        self._write("add_text", lambda w: w.add_text(key, _markdown(columns, rows), self._last_epoch))

    def log_class_results(self, targets: list[int], predictions: list[int], class_names: list[str]) -> None:
        def write(writer) -> None:
            counts, correct = [0] * len(class_names), [0] * len(class_names)
            for target, predicted in zip(targets, predictions):
                counts[target] += 1
                correct[target] += int(target == predicted)
            for c, name in enumerate(class_names):
                if counts[c]:
                    writer.add_scalar(f"test_per_class/{name}", correct[c] / counts[c], self._last_epoch)

        self._write("per-class accuracy", write)

    def finish(self, exit_code: int = 0) -> None:
        writer, self.writer, self.active = self.writer, None, False
        if writer is not None:
            try:
                writer.close()
            except Exception as error:
                warnings.warn(f"TensorBoard close failed ({type(error).__name__}: {error})", TrackerWarning)


def _config_yaml(resolved_config: dict) -> str:
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_yaml(OmegaConf.create(resolved_config))
    except Exception:
        return str(resolved_config)


class CsvTracker(Tracker):
    """CSV tables in the run directory for spreadsheets: `metrics.csv` (one row per epoch, one column per key:
    the file is rewritten when a key first appears, e.g. the first collapse measurement) and `summary.csv`."""

    def __init__(self, cfg, *, run_dir: Path):
        self.directory = Path(run_dir)
        self.rows: list[dict] = []
        self._broken = False
        self.active = True

    def _write(self, what: str, fn: Callable[[], None]) -> None:
        if self._broken:
            return
        try:
            fn()
        except Exception as error:
            warn_once(self, what, error, "CSV")

    def _rewrite(self) -> None:
        from ..atomic import write_text_atomic

        columns: list[str] = []
        for row in self.rows:
            columns.extend(k for k in row if k not in columns)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow([csv_cell(column) for column in columns])
        for row in self.rows:
            writer.writerow([csv_cell(_cell(row[k])) if k in row else "" for k in columns])
        self.directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.directory / "metrics.csv", buffer.getvalue())

    def resume(self, history: list[dict]) -> None:
        self.rows = [dict(row) for row in history]

    def log_epoch(self, row: dict) -> None:
        self.rows.append(dict(row))
        self._write("metrics.csv", self._rewrite)

    def log_summary(self, summary: dict) -> None:
        def write() -> None:
            from ..atomic import write_text_atomic

            buffer = io.StringIO()
            writer = csv.writer(buffer)
            writer.writerow(["key", "value"])
            writer.writerows([csv_cell(k), csv_cell(_cell(v))] for k, v in summary.items() if not isinstance(v, (dict, list)))
            self.directory.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.directory / "summary.csv", buffer.getvalue())

        self._write("summary.csv", write)


def _cell(value):
    if hasattr(value, "item"):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return str(value.tolist())
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value
