"""Many runs in one table: the jobs of Hydra multiruns (or W&B runs), grouped by what the sweep varied, their
seeds aggregated as mean +- std, written as comparison.csv, comparison.md and curves (`compare`).

Jobs are grouped by the override keys (``.hydra/overrides.yaml``) whose values differ across the jobs,
``seed`` and bookkeeping keys (``hydra.*``, ``checkpoint.*``, ...) excepted; the seeds of a group are aggregated
as mean +- std (sample std). Failed or unfinished jobs (no ``summary.json``) are listed and skipped. The plots:
``comparison.png`` plus one PNG per measure under ``comparison_plots/`` (mean over seeds with a +-std band
against epochs; log y-scale for the collapse measures).

Only the standard library, OmegaConf and matplotlib are used here (no torch), so fixedcls-compare starts fast.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from ..errors import FixedclsError
from ..escaping import csv_cell, markdown_row, terminal
from ..runs.stored import literal, load_yaml

#: Final-epoch measures of the table: (summary key without "final/", column title, format).
FINAL_MEASURES: tuple[tuple[str, str, str], ...] = (
    ("train/acc", "train acc %", "pct"),
    ("test/acc", "test acc %", "pct"),
    ("collapse/nc1", "NC1", "sci"),
    ("collapse/nc2_etf_error", "NC2 ETF err", "sci"),
    ("collapse/nc3", "NC3", "sci"),
    ("collapse/nc4", "NC4", "sci"),
    ("collapse/proto_cos", "proto cos", "fix3"),
)


#: Long-tailed runs (data.imbalance): columns shown when some run recorded them.
LONG_TAIL_MEASURES: tuple[tuple[str, str, str], ...] = (
    ("test/balanced_acc", "balanced acc %", "pct"),
    ("test/acc_few", "few-shot acc %", "pct"),
    ("collapse/minority_w_cos", "minority w cos", "fix3"),
    ("collapse/minority_mu_cos", "minority mu cos", "fix3"),
)


#: Epochs-to-collapse columns shown in the markdown table (the CSV has every threshold found).
SPEED_SHOWN: tuple[str, ...] = ("nc1", "proto_cos")


#: Summary figures of the table: (summary key, column title, format).
OTHER_MEASURES: tuple[tuple[str, str, str], ...] = (
    ("collapse_speed/auc_log10_nc1", "AUC log10 NC1", "fix2"),
    ("params/trainable", "trainable params", "int"),
    ("time/train_s_per_epoch", "s/epoch", "fix2"),
)


#: Curves plotted against epochs (those present in the metrics are drawn).
CURVES: tuple[str, ...] = (
    "train/loss", "test/loss", "train/acc", "test/acc",
    "collapse/nc1", "collapse/nc1_trace", "collapse/cdnv", "collapse/nc2_equinorm", "collapse/nc2_equiangle",
    "collapse/nc2_etf_error", "collapse/nc3", "collapse/nc4", "collapse/proto_cos",
    "collapse_test/nc1", "collapse_test/proto_cos",
    "test/balanced_acc", "test/acc_many", "test/acc_medium", "test/acc_few",
    "collapse/minority_w_cos", "collapse/minority_mu_cos", "collapse/minority_w_norm_ratio", "collapse/minority_mu_norm_ratio",
)


OVERVIEW: tuple[str, ...] = ("test/acc", "collapse/nc1", "collapse/nc2_etf_error", "collapse/nc3", "collapse/nc4",
                             "collapse/proto_cos")


#: The overview of long-tailed runs: accuracy by class group and minority collapse.
LONG_TAIL_OVERVIEW: tuple[str, ...] = ("test/acc", "test/balanced_acc", "test/acc_few", "collapse/minority_w_cos",
                                       "collapse/minority_mu_cos", "collapse/nc1")


#: Override keys that never define a group: bookkeeping, not an experimental factor.
IGNORED_KEYS: tuple[str, ...] = ("seed", "name", "resume", "hydra_overrides")


IGNORED_PREFIXES: tuple[str, ...] = ("hydra.", "checkpoint.", "logger", "trainer.progress", "trainer.device",
                                     "trainer.threads", "data.num_workers", "data.root", "data.download")


@dataclass
class Job:
    """One finished training run: where it came from, its settings and its numbers."""

    source: str
    settings: dict[str, str]
    seed: Any
    summary: dict
    history: list[dict] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # settings keys in the order they were given
    config: Any = None  # the run's config: the value of a key that other jobs override but this one does not


# ---------------------------------------------------------------------------------------------
# reading runs
# ---------------------------------------------------------------------------------------------
def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _is_job_dir(path: Path) -> bool:
    return (path / ".hydra" / "config.yaml").is_file() or (path / "summary.json").is_file() or (path / "metrics.jsonl").is_file()


def find_job_dirs(root: Path) -> list[Path]:
    """Run directories at or under `root` (a run directory, a sweep directory, or a folder of sweeps)."""
    if _is_job_dir(root):
        return [root]
    found: list[Path] = []
    for child in sorted((p for p in root.iterdir() if p.is_dir()), key=_natural):
        if child.name in (".hydra", "wandb", "checkpoints", "comparison_plots") or child.name.startswith("."):
            continue
        found.extend(find_job_dirs(child))
    return found


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    """Hydra override strings -> {key: value} ('+key=v', '++key=v' and '~key' included)."""
    out: dict[str, str] = {}
    for item in overrides:
        item = str(item).strip()
        if item.startswith("~"):
            out[item[1:].split("=", 1)[0]] = "<deleted>"
            continue
        key, sep, value = item.lstrip("+").partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _config_value(config, key: str) -> Optional[str]:
    """The value a config gives `key` (a group name like `head` reads `head.name`), as text, or None."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if config is None:
        return None
    node = OmegaConf.create(literal(config)) if isinstance(config, dict) else config
    for candidate in (key, f"{key}.name"):
        try:
            value = OmegaConf.select(node, candidate, default=None, throw_on_resolution_failure=False)
        except Exception:
            value = None
        if value is not None and not isinstance(value, (DictConfig, ListConfig)):
            return _scalar_text(value)
    return None


def _ignored(key: str, ignore: Sequence[str]) -> bool:
    return key in IGNORED_KEYS or key in ignore or any(key.startswith(p) for p in IGNORED_PREFIXES)


def load_job(path: Path) -> Job | str:
    """A Job, or the reason (text) why this run directory cannot be compared."""
    summary_path = path / "summary.json"
    if not summary_path.is_file():
        return "no summary.json (the job failed or is still running)"
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError) as error:
        return f"unreadable summary.json ({error})"
    if not isinstance(summary, dict):
        return f"summary.json holds a JSON {type(summary).__name__}, not an object: not written by fixedcls-train"
    history: list[dict] = []
    metrics_path = path / "metrics.jsonl"
    if metrics_path.is_file():
        try:
            lines = metrics_path.read_text().splitlines()
        except (OSError, ValueError) as error:
            return f"unreadable metrics.jsonl ({error})"
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line) if line.strip() else None
            except ValueError:
                continue  # a line cut by a crash: the summary says the job finished, keep what is readable
            if row is None:
                continue
            if not isinstance(row, dict):
                return f"metrics.jsonl line {number} holds a JSON {type(row).__name__}, not an object: not written by fixedcls-train"
            history.append(row)
    config = None
    hydra_dir = path / ".hydra"
    settings: dict[str, str] = {}
    if (hydra_dir / "config.yaml").is_file():
        from omegaconf import OmegaConf

        try:
            config = load_yaml(hydra_dir / "config.yaml")  # data: a ${oc.env:...} in it stays text
            overrides = OmegaConf.to_container(OmegaConf.load(hydra_dir / "overrides.yaml")) \
                if (hydra_dir / "overrides.yaml").is_file() else []
        except Exception as error:
            return f"unreadable .hydra files ({error})"
        settings = parse_overrides(overrides or [])
    else:  # a run directory written by train() without Hydra: what the summary says
        for key, summary_key in (("head", "head"), ("model.backbone", "backbone"), ("data", "data")):
            if summary.get(summary_key) is not None:
                settings[key] = _scalar_text(summary[summary_key])
    seed = settings.get("seed", _config_value(config, "seed") or summary.get("seed"))
    return Job(source=str(path), settings=settings, seed=seed, summary=summary, history=history,
               order=list(settings), config=config)


def load_dirs(dirs: Sequence[str | Path]) -> tuple[list[Job], list[tuple[str, str]]]:
    """(finished jobs, [(directory, why skipped)]) under the given sweep or run directories."""
    jobs: list[Job] = []
    skipped: list[tuple[str, str]] = []
    for directory in dirs:
        root = Path(directory)
        if not root.is_dir():
            raise FixedclsError(f"{root} is not a directory: pass Hydra multirun directories (multirun/<date>/<time>) or run directories")
        job_dirs = find_job_dirs(root)
        if not job_dirs:
            raise FixedclsError(f"no run directories under {root}: pass a Hydra multirun directory (holding 0/, 1/, ... "
                                f"with .hydra/ and summary.json) or a run directory")
        for path in job_dirs:
            result = load_job(path)
            if isinstance(result, str):
                skipped.append((str(path), result))
            else:
                jobs.append(result)
    return jobs, skipped


def _flatten(config: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(config, dict):
        for key, value in config.items():
            out.update(_flatten(value, f"{prefix}{key}."))
    elif isinstance(config, (list, tuple)):
        out[prefix[:-1]] = json.dumps(config)
    else:
        out[prefix[:-1]] = _scalar_text(config)
    return out


def load_wandb(path: str, group: Optional[str] = None) -> tuple[list[Job], list[tuple[str, str]]]:
    """Finished runs of W&B project `path` (ENTITY/PROJECT) through the public API (needs network and a login)."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        raise FixedclsError(f"fixedcls-compare --wandb reads runs through the W&B API, which needs W&B online, but "
                            f"WANDB_MODE={mode or 'disabled'}: unset it (and `wandb login`), or compare the local "
                            f"sweep directories instead (fixedcls-compare multirun/<date>/<time>)")
    if path.count("/") != 1 or not all(path.split("/")):
        raise FixedclsError(f"--wandb {path}: give ENTITY/PROJECT, e.g. --wandb my-team/fixedcls")
    try:
        import wandb

        api = wandb.Api(timeout=60)
        runs = list(api.runs(path, filters={"group": group} if group else None))
    except Exception as error:
        raise FixedclsError(f"could not read the W&B runs of {path} ({type(error).__name__}: {error}): check "
                            f"ENTITY/PROJECT, `wandb login` and the network") from error
    jobs: list[Job] = []
    skipped: list[tuple[str, str]] = []
    for run in runs:
        where = f"wandb:{path}/{getattr(run, 'id', '?')} ({getattr(run, 'name', '')})"
        state = getattr(run, "state", "finished")
        if state != "finished":
            skipped.append((where, f"state {state}"))
            continue
        config = dict(run.config)
        summary = dict(getattr(run.summary, "_json_dict", None) or dict(run.summary))
        overrides = config.get("hydra_overrides")
        if overrides:
            settings = parse_overrides(overrides)
        else:  # not started by fixedcls-train under Hydra: every config value may be a factor
            settings = {k: v for k, v in _flatten(config).items() if not k.startswith("_")}
        rows: dict[Any, dict] = {}
        for row in run.scan_history():
            epoch = row.get("epoch")
            values = {k: v for k, v in row.items() if not k.startswith("_") and isinstance(v, (int, float))
                      and not isinstance(v, bool)}
            if epoch is not None and len(values) > 1:
                rows.setdefault(epoch, {}).update(values)
        if not summary:
            skipped.append((where, "empty summary"))
            continue
        seed = settings.get("seed", _scalar_text(config.get("seed")) if config.get("seed") is not None else summary.get("seed"))
        jobs.append(Job(source=where, settings=settings, seed=seed, summary=summary,
                        history=[rows[e] for e in sorted(rows)], order=list(settings), config=config))
    return jobs, skipped


# ---------------------------------------------------------------------------------------------
# grouping and aggregation
# ---------------------------------------------------------------------------------------------
def _setting(job: Job, key: str) -> str:
    if key in job.settings:
        return job.settings[key]
    value = _config_value(job.config, key)
    return value if value is not None else "(default)"


def varied_keys(jobs: Sequence[Job], ignore: Sequence[str] = ()) -> list[str]:
    """The setting keys whose values differ across jobs (seed and bookkeeping keys excepted), in given order."""
    keys: list[str] = []
    for job in jobs:
        for key in job.order:
            if key not in keys and not _ignored(key, ignore):
                keys.append(key)
    return [k for k in keys if len({_setting(job, k) for job in jobs}) > 1]


def group_jobs(jobs: Sequence[Job], keys: Sequence[str]) -> dict[str, list[Job]]:
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        label = ", ".join(f"{k}={_setting(job, k)}" for k in keys) or "all"
        groups.setdefault(label, []).append(job)
    return groups


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) or math.isinf(value) else None


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _final(job: Job, key: str) -> Optional[float]:
    """The measure in the run's final row: summary final/<key>, else the last metrics row that has it."""
    value = _number(job.summary.get(f"final/{key}"))
    if value is None:
        for row in reversed(job.history):
            value = _number(row.get(key))
            if value is not None:
                break
    return value


def speed_keys(jobs: Sequence[Job]) -> list[str]:
    keys: list[str] = []
    for job in jobs:
        for key in job.summary:
            if key.startswith("collapse_speed/epochs_to/") and key not in keys:
                keys.append(key)
    return keys


def aggregate(groups: dict[str, list[Job]], keys: Sequence[str]) -> list[dict]:
    """One dict per group: the settings, seeds, and for each measure <key>/mean, <key>/std, <key>/n."""
    all_jobs = [job for group in groups.values() for job in group]
    speeds = speed_keys(all_jobs)
    rows = []
    for label, group in groups.items():
        row: dict[str, Any] = {"group": label}
        for key in keys:
            row[key] = _setting(group[0], key)
        row["seeds"] = len(group)
        row["seed_values"] = " ".join(str(job.seed) for job in group)
        for key, _, _ in FINAL_MEASURES + LONG_TAIL_MEASURES:
            values = [v for v in (_final(job, key) for job in group) if v is not None]
            row[f"{key}/mean"], row[f"{key}/std"] = _mean_std(values)
            row[f"{key}/n"] = len(values)
        for key in speeds:  # None means the threshold was never reached: averaged over the jobs that reached it
            values = [v for v in (_number(job.summary.get(key)) for job in group) if v is not None]
            row[f"{key}/mean"], row[f"{key}/std"] = _mean_std(values)
            row[f"{key}/n"] = len(values)
        for key, _, _ in OTHER_MEASURES:
            values = [v for v in (_number(job.summary.get(key)) for job in group) if v is not None]
            row[f"{key}/mean"], row[f"{key}/std"] = _mean_std(values)
            row[f"{key}/n"] = len(values)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def _fmt(mean: float, std: float, n: int, kind: str, seeds: int) -> str:
    if n == 0 or math.isnan(mean):
        return "–"
    if kind == "pct":
        text, spread = f"{100 * mean:.1f}", f"{100 * std:.1f}"
    elif kind == "sci":
        text, spread = f"{mean:.3g}", f"{std:.2g}"
    elif kind == "fix3":
        text, spread = f"{mean:.3f}", f"{std:.3f}"
    elif kind == "int":
        return f"{mean:,.0f}"
    elif kind == "epochs":
        text, spread = f"{mean:.1f}" if n > 1 else f"{mean:.0f}", f"{std:.1f}"
    else:
        text, spread = f"{mean:.2f}", f"{std:.2f}"
    out = text if n < 2 else f"{text} ± {spread}"
    if kind == "epochs" and n < seeds:
        out += f" ({n}/{seeds})"
    return out


def markdown_table(rows: Sequence[dict], keys: Sequence[str]) -> str:
    """The comparison as a markdown table (mean ± std over seeds)."""
    speeds = [s for s in SPEED_SHOWN if any(f"collapse_speed/epochs_to/{s}/mean" in r for r in rows)]
    finals = FINAL_MEASURES + tuple(m for m in LONG_TAIL_MEASURES if any(r.get(f"{m[0]}/n") for r in rows))
    header = ["group" if not keys else " / ".join(keys), "seeds"] + [t for _, t, _ in finals] + \
             [f"epochs to {s}" for s in speeds] + [t for _, t, _ in OTHER_MEASURES]
    lines = [markdown_row(header), "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        seeds = row["seeds"]
        cells = [" / ".join(str(row[k]) for k in keys) if keys else row["group"], str(seeds)]
        for key, _, kind in finals:
            cells.append(_fmt(row[f"{key}/mean"], row[f"{key}/std"], row[f"{key}/n"], kind, seeds))
        for s in speeds:
            key = f"collapse_speed/epochs_to/{s}"
            n = row.get(f"{key}/n", 0)
            cells.append("never" if n == 0 else _fmt(row[f"{key}/mean"], row[f"{key}/std"], n, "epochs", seeds))
        for key, _, kind in OTHER_MEASURES:
            cells.append(_fmt(row[f"{key}/mean"], row[f"{key}/std"], row[f"{key}/n"], kind, seeds))
        lines.append(markdown_row(cells))
    return "\n".join(lines)


def _blank_nan(value: Any) -> Any:
    return "" if isinstance(value, float) and math.isnan(value) else value


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([csv_cell(column) for column in columns])
    for row in rows:
        writer.writerow([csv_cell(_blank_nan(row.get(column, ""))) for column in columns])
    path.write_text(buffer.getvalue())


def _log_scale(key: str) -> bool:
    base = key.rsplit("/", 1)[-1]
    return key.startswith("collapse") and (base.startswith("nc") or base == "cdnv")


def curve(jobs: Sequence[Job], key: str) -> tuple[list[float], list[float], list[float]]:
    """(epochs, mean, std) of `key` over the jobs' metrics rows, epoch by epoch."""
    by_epoch: dict[float, list[float]] = {}
    for job in jobs:
        for i, row in enumerate(job.history):
            value = _number(row.get(key))
            if value is not None and math.isfinite(value):
                by_epoch.setdefault(row.get("epoch", i + 1), []).append(value)
    epochs = sorted(by_epoch)
    stats = [_mean_std(by_epoch[e]) for e in epochs]
    return epochs, [m for m, _ in stats], [s for _, s in stats]


def _draw(ax, groups: dict[str, list[Job]], key: str) -> bool:
    """Mean over seeds with a +-std band, one line per group. Collapse measures on a log y-scale; when a
    curve or band reaches 0 (nc4 often does) a symmetric-log scale, linear below the smallest positive mean."""
    log = _log_scale(key)
    curves = [(label, len(jobs), *curve(jobs, key)) for label, jobs in groups.items()]
    curves = [c for c in curves if c[2]]
    if not curves:
        return False
    positive = [m for c in curves for m in c[3] if m > 0]
    touches_zero = any(m - s <= 0 for c in curves for m, s in zip(c[3], c[4]))
    for label, n, epochs, mean, std in curves:
        line, = ax.plot(epochs, mean, marker="o", markersize=2.5, label=f"{label} (n={n})")
        low = [max(m - s, 0.0) if log else m - s for m, s in zip(mean, std)]
        high = [m + s for m, s in zip(mean, std)]
        ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if log and positive:
        if touches_zero:
            ax.set_yscale("symlog", linthresh=max(min(positive), 1e-12))
            ax.set_ylim(bottom=0)
        else:
            ax.set_yscale("log")
    ax.set_title(key + (" (symlog)" if log and positive and touches_zero else ""), fontsize=9)
    ax.set_xlabel("epoch", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.tick_params(labelsize=7)
    return True


def plot_curves(groups: dict[str, list[Job]], out: Path) -> list[Path]:
    """One PNG per measure (comparison_plots/<measure>.png) and an overview grid (comparison.png)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written: list[Path] = []
    folder = out / "comparison_plots"
    for key in CURVES:
        fig = Figure(figsize=(6.0, 4.0))  # fixed margins: a layout engine would double the drawing time
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        fig.subplots_adjust(left=0.13, right=0.97, bottom=0.12, top=0.92)
        if not _draw(ax, groups, key):
            continue
        ax.legend(fontsize=7)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / (key.replace("/", "_") + ".png")
        fig.savefig(path, dpi=100)
        written.append(path)
    recorded = {k for jobs in groups.values() for job in jobs for row in job.history for k in row}
    overview = LONG_TAIL_OVERVIEW if "test/balanced_acc" in recorded and "test/acc_few" in recorded else OVERVIEW
    keys = [k for k in overview if k in recorded]
    if keys:
        ncols = min(3, len(keys))
        nrows = math.ceil(len(keys) / ncols)
        fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows + 0.8))
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        fig.subplots_adjust(left=0.07, right=0.98, bottom=0.16 if nrows > 1 else 0.25, top=0.9, hspace=0.4, wspace=0.25)
        for ax, key in zip(axes, keys):
            _draw(ax, groups, key)
        for ax in axes[len(keys):]:
            ax.set_visible(False)
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="lower center", ncols=min(4, len(labels)), fontsize=8)
        fig.suptitle("mean ± std over seeds")
        path = out / "comparison.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


@dataclass
class Comparison:
    rows: list[dict]
    keys: list[str]
    groups: dict[str, list[Job]]
    skipped: list[tuple[str, str]]
    table: str
    files: list[Path]


def compare(jobs: Sequence[Job], skipped: Sequence[tuple[str, str]], out: Path, *, by: Sequence[str] = (),
            ignore: Sequence[str] = (), plots: bool = True, sources: Sequence[str] = ()) -> Comparison:
    """Group, aggregate and write comparison.csv / comparison.md (and the plots) into `out`."""
    if not jobs:
        listed = "; ".join(f"{d}: {why}" for d, why in skipped[:3])
        raise FixedclsError(f"no finished job to compare ({len(skipped)} skipped{': ' + listed if listed else ''}): "
                            f"wait for the sweep to finish or check the job logs")
    keys = list(by) or varied_keys(jobs, ignore)
    groups = group_jobs(jobs, keys)
    rows = aggregate(groups, keys)
    table = markdown_table(rows, keys)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "comparison.csv", out / "comparison.md"]
    write_csv(files[0], rows)
    text = ["# fixedcls comparison", "", f"Sources: {', '.join(map(terminal, sources)) or '-'}; {len(jobs)} finished job(s), "
            f"grouped by {', '.join(keys) or 'nothing (one group)'}; mean ± std over seeds (sample std); "
            f"'epochs to X': first epoch at the collapse threshold, averaged over the seeds that reached it "
            f"((k/n) when only k of n did).", "", table, ""]
    if skipped:
        text += [f"Skipped {len(skipped)} job(s):", ""] + [f"- {terminal(d)}: {terminal(why)}" for d, why in skipped] + [""]
    files[1].write_text("\n".join(text))
    if plots:
        files += plot_curves(groups, out)
    return Comparison(rows=rows, keys=keys, groups=groups, skipped=list(skipped), table=table, files=files)
