"""fixedcls-compat: train model generations and measure their compatibility (CoReS / CL2R, SPEC section 4).

    # train T generations (class-incremental), then measure them
    fixedcls-compat train experiment=cores_digits [hydra overrides]        # CoReS: cumulative, from scratch
    fixedcls-compat train experiment=cores_digits_finetune                 # CL2R: fine-tune + rehearsal + distillation
    fixedcls-compat train experiment=cores_cifar100 data.root=/data/cifar  # CoReS main protocol: CIFAR-100, 10 tasks

    # measure any checkpoints (files or run folders), oldest first
    fixedcls-compat CKPT_1 ... CKPT_T [--json PATH] [--png PATH] [--query SPLIT] [--gallery SPLIT] [--data NAME|KEY=VALUE ...]
        [--metric retrieval|verification] [--pairs N] [--folds K]

    # search a stored gallery (fixedcls-embed OLD_CKPT --out gallery.safetensors) with newer models' queries
    fixedcls-compat CKPT ... --gallery gallery.safetensors [--json PATH]

The measures live in `fixedcls.compatibility`; this module reports them and runs the generations.
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import checkpoint as ckpt
from . import runs
from .build import plain_config, stored_config
from .cli import exit_if_jobs_failed, output_file, positive_int, refuse_bad_overrides, run_command, run_job
from .compatibility import (METRICS, SPLITS, compatibility, evaluation_data_config, gallery_compatibility, load_checkpoint,
                            split_classes)
from .config import conf_dir
from .errors import FixedclsError
from .identity import run_identity
from .loggers import jsonable, write_json
from .runtime import choice

log = logging.getLogger("fixedcls")
PROTOCOLS = ("cumulative", "finetune")
GENERATION_CHECKPOINTS = ("last", "best")


def _fmt(value: Optional[float], signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def format_matrix(M: Sequence[Sequence[Optional[float]]], title: str) -> str:
    """The lower triangle as a text table (rows: query model t, columns: gallery model i, in %)."""
    T = len(M)
    lines = [title, "query\\gallery " + "".join(f"{f'phi_{i + 1}':>9}" for i in range(T))]
    for t in range(T):
        cells = []
        for i in range(T):
            value = M[t][i] if i <= t else None
            cells.append(f"{'' if i > t else ('n/a' if value is None or math.isnan(value) else f'{100 * value:.1f}'):>9}")
        lines.append(f"{f'phi_{t + 1}':<14}" + "".join(cells))
    return "\n".join(lines)


# (matrix key, suffix of its criteria, title, short name); the verification matrix only with --metric verification
MATRICES = (("M", "", "top-1 NN accuracy (%)", "top-1"), ("M_map", "_map", "mAP (%)", "mAP"),
            ("M_verification", "_verification", "pair-verification accuracy (%)", "verification"))


def matrices_of(result: dict) -> list[tuple[str, str, str, str]]:
    return [entry for entry in MATRICES if entry[0] in result]


def format_criteria(result: dict, suffix: str = "") -> str:
    """One line: AC (strict, SPEC 4), AC_ties (a tie is compatible: the CoReS / CL2R code), AM, BC, FC."""
    return (f"AC {_fmt(result['AC' + suffix])}  AC_ties {_fmt(result['AC_ties' + suffix])}  AM {_fmt(result['AM' + suffix])}  "
            f"BC {_fmt(result['BC' + suffix], True)}  FC {_fmt(result['FC' + suffix], True)}")


def format_report(result: dict) -> str:
    parts = [f"compatibility of {len(result['M'])} models: query {result['query']} ({result['num_query']}), "
             f"gallery {result['gallery']} ({result['num_gallery']}), {result['data']}"]
    if "verification" in result:
        v = result["verification"]
        parts.append(f"verification: {v['pairs']} pairs ({v['same_class']} of one class), {v['folds']} folds, seed {v['seed']}")
    for key, suffix, title, _ in matrices_of(result):
        parts.append(format_matrix(result[key], title))
        parts.append(format_criteria(result, suffix))
    parts.append("AC: share of pairs t > i with M[t][i] > M[i][i] (strict); "
                 "AC_ties: share without M[t][i] < M[i][i] (a tie passes, as in the CoReS / CL2R code)")
    return "\n".join(parts)


def plot_matrix(result: dict, path: str | Path, title: Optional[str] = None) -> Path:
    """Heatmaps of M (top-1), M_map (and M_verification): the lower triangle, values in %, criteria in the titles."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    T = len(result["M"])
    panels = matrices_of(result)
    figure = Figure(figsize=(4.2 * len(panels) + 1, 3.6 + 0.25 * T))
    FigureCanvasAgg(figure)
    labels = [f"phi_{t + 1}" for t in range(T)]
    for column, (key, suffix, _, name) in enumerate(panels):
        ax = figure.add_subplot(1, len(panels), column + 1)
        values = np.array([[np.nan if i > t or result[key][t][i] is None else 100 * result[key][t][i]
                            for i in range(T)] for t in range(T)], dtype=float)
        image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0, vmax=100)
        for t in range(T):
            for i in range(t + 1):
                text = "n/a" if np.isnan(values[t, i]) else f"{values[t, i]:.1f}"
                ax.text(i, t, text, ha="center", va="center", fontsize=9,
                        color="white" if np.isnan(values[t, i]) or values[t, i] < 60 else "black")
        ax.set_xticks(range(T), labels)
        ax.set_yticks(range(T), labels)
        ax.set_xlabel("gallery model i")
        ax.set_ylabel("query model t")
        ax.set_title(f"{name}: AC {_fmt(result['AC' + suffix])}, AC_ties {_fmt(result['AC_ties' + suffix])}, "
                     f"AM {_fmt(result['AM' + suffix])}", fontsize=9)
        figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def log_to_tracker(result: dict, logger_cfg, run_dir: Path, png: Optional[Path], resolved_config: dict) -> None:
    """Send the matrices and criteria to the configured tracker (W&B) as a `compat` job; nothing for logger none."""
    if logger_cfg is None or logger_cfg.name == "none":
        return
    from omegaconf import OmegaConf

    from .loggers import create_tracker

    logger_cfg = OmegaConf.merge(logger_cfg, {"job_type": "compat"})
    config = {**resolved_config, "compat": {k: v for k, v in jsonable(result).items() if not k.startswith("M")}}
    try:
        tracker = create_tracker(logger_cfg, run_dir=Path(run_dir), resolved_config=config)
    except ImportError as error:
        raise FixedclsError(f"logger {logger_cfg.name} is not available here ({error}): use --logger none") from None
    T = len(result["M"])
    for key, *_ in matrices_of(result):
        rows = [[f"phi_{t + 1}"] + [result[key][t][i] if i <= t else None for i in range(T)] for t in range(T)]
        tracker.log_table(f"compat/{key}", ["query"] + [f"phi_{i + 1}" for i in range(T)], rows)
    tracker.log_summary({f"compat/{k}": v for k, v in jsonable(result).items()
                         if k[:2] in ("AC", "AM", "BC", "FC")})
    if png is not None:
        tracker.log_image("compat", png)
    tracker.finish(0)


def format_gallery_report(result: dict) -> str:
    """One line per query model: its top-1 and mAP against the stored gallery (the matrix entry M[t][g])."""
    source = result["gallery_model"].get("source", "?")
    lines = [f"queries: {result['query']} ({result['num_query']}), {result['data']}; stored gallery {result['gallery_file']}: "
             f"{result['gallery_source']} ({result['num_gallery']}), embedded by {source}",
             f"{'query model':<48}{'top-1 (%)':>10}{'mAP (%)':>10}"]
    for info, top1, mean_ap in zip(result["models"], result["top1"], result["map"]):
        cells = ["n/a" if v is None or math.isnan(v) else f"{100 * v:.1f}" for v in (top1, mean_ap)]
        lines.append(f"{info['checkpoint'][-48:]:<48}{cells[0]:>10}{cells[1]:>10}")
    return "\n".join(lines)


def report(result: dict, *, json_path: Optional[Path], png_path: Optional[Path], title: Optional[str] = None,
           echo: Callable[[str], None] = print) -> None:
    echo(format_report(result))
    if json_path is not None:
        echo(f"wrote {write_json(json_path, result)}")
    if png_path is not None:
        echo(f"wrote {plot_matrix(result, png_path, title)}")


def _generations_dir(cfg) -> Path:
    """Where the generations' checkpoints go: checkpoint.dir, or the folder of cfg.name and the identity of the
    whole sequence (generations.* included), `<safe name>-<identity[:8]>`, so the jobs of a sweep get folders
    of their own (one that holds generations: gen<t>/ with checkpoints)."""
    if cfg.checkpoint.dir:
        return Path(cfg.checkpoint.dir).expanduser()

    def holds_generations(directory: Path) -> bool:
        return directory.is_dir() and any(ckpt.candidates(g) for g in directory.glob("gen*") if g.is_dir())

    identity, _ = run_identity(plain_config(cfg), keep=("generations.",))
    return runs.run_directory(Path(cfg.checkpoint.root).expanduser(), runs.run_base(str(cfg.name), identity),
                              resume=cfg.resume == "auto", holds_run=holds_generations)


def _num_classes(cfg) -> int:
    """K of the data config: data.num_classes, else what the dataset holds (loaded once to count)."""
    if cfg.data.num_classes is not None:
        return int(cfg.data.num_classes)
    from .data import create_data

    return create_data(cfg.data).num_classes


def generation_tasks(cfg) -> list[list[int]]:
    """The classes each generation adds: generations.tasks, or generations.num_tasks equal tasks of the K classes."""
    g = cfg.generations
    if g.num_tasks is not None:
        if g.tasks:
            raise FixedclsError("generations.tasks and generations.num_tasks are both set: keep one "
                                "(generations.tasks=[] to split the classes into num_tasks tasks)")
        return split_classes(_num_classes(cfg), int(g.num_tasks), g.class_order_seed)
    tasks = [sorted({int(c) for c in task}) for task in (g.tasks or [])]
    if not tasks or any(not task for task in tasks):
        raise FixedclsError("generations.tasks is empty: list the classes each generation adds, "
                            "e.g. generations.tasks=[[0,1,2,3],[4,5,6],[7,8,9]], or set generations.num_tasks=T "
                            "(or experiment=cores_digits)")
    return tasks


def generation_configs(cfg) -> list:
    """One fixedcls-train config per generation of cfg.generations (checkpoint dirs set by the caller)."""
    g = cfg.generations
    tasks = generation_tasks(cfg)
    if len(tasks) < 2:
        raise FixedclsError(f"compatibility needs two models but generations plans {len(tasks)}: "
                            "give generations.tasks two or more lists, or generations.num_tasks >= 2")
    if g.checkpoint not in GENERATION_CHECKPOINTS:
        raise FixedclsError(f"unknown generations.checkpoint={g.checkpoint!r}: choose last (the final epoch) or "
                            "best (the epoch with the best checkpoint.best_metric)")
    if g.metric not in METRICS:
        raise FixedclsError(f"unknown generations.metric={g.metric!r}: choose {' or '.join(METRICS)}")
    if g.metric == "verification" and not 2 <= g.folds <= g.pairs:
        raise FixedclsError(f"generations.pairs={g.pairs}, generations.folds={g.folds}: give at least 2 pairs and "
                            f"2 to {max(g.pairs, 2)} folds (the authors use 6000 pairs in 10 folds)")
    evaluation_data_config(cfg.data, g.eval_data)  # a bad item fails now, not after hours of training
    flat = [c for task in tasks for c in task]
    if len(flat) != len(set(flat)):
        raise FixedclsError(f"generations.tasks={tasks} repeat a class: each class belongs to one generation")
    if g.protocol not in PROTOCOLS:
        raise FixedclsError(f"unknown generations.protocol={g.protocol!r}: choose cumulative (CoReS) or finetune (CL2R)")
    backbones = list(g.backbones) if g.backbones else [cfg.model.backbone] * len(tasks)
    if len(backbones) != len(tasks):
        raise FixedclsError(f"generations.backbones has {len(backbones)} names for {len(tasks)} generations: give one per generation")
    if g.protocol == "finetune" and len(set(backbones)) > 1:
        raise FixedclsError("generations.protocol=finetune starts each generation from the previous one, so all use one "
                            "backbone: drop generations.backbones or use protocol=cumulative")
    if cfg.data.classes is not None or cfg.data.old_classes is not None:
        raise FixedclsError("data.classes / data.old_classes are set per generation from generations.tasks: leave them unset")
    if g.protocol == "cumulative" and (cfg.data.rehearsal or cfg.trainer.distill_weight):
        raise FixedclsError("data.rehearsal and trainer.distill_weight apply to generations.protocol=finetune "
                            "(cumulative trains on all data seen so far): set protocol=finetune or leave them at 0")
    if cfg.resume not in (None, "auto"):
        raise FixedclsError(f"resume={cfg.resume}: a sequence of generations continues with resume=auto only")
    configs, seen = [], []
    base_name = str(cfg.name)
    for t, (task, backbone) in enumerate(zip(tasks, backbones), 1):
        c = copy.deepcopy(cfg)
        c.name = f"{base_name}-gen{t}"
        c.seed = int(cfg.seed) + t - 1  # generations are trained apart: no shared initialisation or data order
        c.model.backbone = backbone
        if g.protocol == "cumulative":
            c.data.classes = sorted(seen + task)
        else:
            c.data.classes = task
            c.data.old_classes = sorted(seen) or None
            c.data.rehearsal = cfg.data.rehearsal if seen else 0
            c.trainer.distill_weight = cfg.trainer.distill_weight if seen else 0.0
        configs.append(c)
        seen += task
    return configs


def run_generations(cfg, run_dir: str | Path) -> dict:
    """Train the generations of cfg.generations in sequence, then measure their compatibility.

    Writes <run_dir>/gen<t>/ (each generation's run), <run_dir>/generations.json, compat.json and compat.png;
    checkpoints go to <checkpoint dir>/gen<t>/. Generation t runs with seed + t - 1 (models trained apart).
    generations.checkpoint picks the file measured and fine-tuned from: last.pt, or best.pt (checkpoint.best_metric).
    With resume=auto finished generations are not trained again.
    """
    from .train import train

    run_dir = Path(run_dir)
    configs = generation_configs(cfg)
    chosen = ckpt.BEST if cfg.generations.checkpoint == "best" else ckpt.LAST
    base = _generations_dir(cfg)
    log.info(f"{len(configs)} generations ({cfg.generations.protocol}), {cfg.head.name} head; checkpoints in {base}/gen<t>")
    paths, rows = [], []
    for t, c in enumerate(configs, 1):
        c.checkpoint.dir = str(base / f"gen{t}")
        if cfg.generations.protocol == "finetune" and t > 1:
            c.model.init_from = str(paths[-1])
        log.info(f"generation {t}/{len(configs)}: classes {list(c.data.classes)}"
                 + (f" + memory of {c.data.rehearsal} per old class" if c.data.rehearsal else "")
                 + (f", from {c.model.init_from}" if c.model.init_from else ", from scratch"))
        summary = train(c, run_dir / f"gen{t}")
        paths.append(Path(c.checkpoint.dir) / chosen)
        if not paths[-1].is_file():
            raise FixedclsError(f"generation {t} wrote no {chosen}: checkpoint.best_metric={c.checkpoint.best_metric} "
                                "was never measured; name a logged metric (e.g. test/acc) or set generations.checkpoint=last")
        rows.append({"generation": t, "classes": list(c.data.classes),
                     "old_classes": list(c.data.old_classes) if c.data.old_classes is not None else None,
                     "backbone": c.model.backbone, "seed": int(c.seed), "checkpoint": str(paths[-1]),
                     "test_acc": summary.get("final/test/acc")})
    if int(os.environ.get("RANK", "0")) != 0:
        return {"generations": rows}
    write_json(run_dir / "generations.json",
               {"protocol": cfg.generations.protocol, "head": cfg.head.name, "generations": rows})
    g = cfg.generations
    result = compatibility(paths, query=g.query, gallery=g.gallery, data=list(g.eval_data), metric=g.metric,
                           pairs=int(g.pairs), folds=int(g.folds), pair_seed=int(cfg.seed),
                           device=choice(cfg.trainer.device))
    result["protocol"] = cfg.generations.protocol
    result["test_acc"] = [row["test_acc"] for row in rows]
    title = f"{cfg.head.name} head, {cfg.generations.protocol}, {cfg.data.name}"
    report(result, json_path=run_dir / "compat.json", png_path=run_dir / "compat.png", title=title, echo=log.info)
    log_to_tracker(result, cfg.logger, run_dir, run_dir / "compat.png", plain_config(cfg))
    return result


def _generations_hydra_main():
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from .config import register_configs

    register_configs()

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
    def generations_main(cfg):
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        return run_job(lambda: run_generations(cfg, run_dir).get("AM"), prog="fixedcls-compat")

    generations_main()
    exit_if_jobs_failed("fixedcls-compat")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fixedcls-compat",
        description="Compatibility matrix (SPEC 4, CoReS) of model generations: queries embedded by model t, gallery by "
                    "model i <= t, cosine retrieval top-1 and mAP (and, with --metric verification, pair verification); "
                    "AC (strict), AC_ties (the CoReS / CL2R code's rule), AM, BC, FC. "
                    "`fixedcls-compat train [hydra overrides]` trains the generations first (see experiment=cores_digits).",
    )
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoints (or checkpoint directories), oldest first")
    parser.add_argument("--json", type=output_file, help="write the matrices and criteria here")
    parser.add_argument("--png", type=output_file, help="heatmap path (default: next to --json, else compat.png)")
    parser.add_argument("--query", default="test", help="split embedded by the newer model (train or test; default test)")
    parser.add_argument("--gallery", default="train", help="split embedded by the older model (default train), or a "
                                                           "gallery file written by fixedcls-embed (never re-indexed)")
    parser.add_argument("--data", nargs="+", default=[], metavar="NAME|KEY=VALUE",
                        help="evaluation data instead of the first model's: a conf/data preset and/or data keys "
                             "(e.g. --data cifar10 root=/data/cifar)")
    parser.add_argument("--classes", type=int, nargs="+", help="only these classes in query and gallery (default: all)")
    parser.add_argument("--metric", default="retrieval", choices=METRICS,
                        help="retrieval: M is top-1 and mAP; verification: also the k-fold pair-verification accuracy "
                             "of the CoReS / CL2R code (docs/compatibility.md)")
    parser.add_argument("--pairs", type=positive_int, default=6000,
                        help="verification pairs, half of them of one class (default 6000, as the authors)")
    parser.add_argument("--folds", type=positive_int, default=10, help="verification folds (default 10)")
    parser.add_argument("--pair-seed", type=int, default=0, help="seed of the verification pairs (default 0)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-size", type=positive_int, help="embedding batch size (default data.eval_batch_size)")
    parser.add_argument("--logger", default="none", help="wandb: also log to the W&B project of the first model's config")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-sc"], ["--shell-completion"]):
        # The completion script that `fixedcls-compat train -sc install=bash` installs calls
        # `fixedcls-compat -sc query=bash` for the line being typed; Hydra completes the words after the
        # program name, so the `train` word is taken out of that line.
        line = os.environ.get("COMP_LINE")
        if line is not None:
            os.environ["COMP_LINE"] = re.sub(r"^(\s*\S+)\s+train(?=\s|$)", r"\1", line)
        argv = ["train", *argv]
    if argv and argv[0] == "train" and not Path("train").exists():
        refuse_bad_overrides(argv[1:], prog="fixedcls-compat")  # the same early check as fixedcls-train
        sys.argv = [sys.argv[0], *argv[1:]]
        _generations_hydra_main()
        return 0
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_command(lambda: _measure(args), prog="fixedcls-compat")


def _measure(args) -> int:
    if args.gallery not in SPLITS:
        if not Path(args.gallery).expanduser().is_file():
            raise FixedclsError(f"--gallery {args.gallery} is neither a split (train, test) nor a gallery file: "
                                f"name a split, or write the file with fixedcls-embed CKPT --out {args.gallery}")
        result = gallery_compatibility(args.checkpoints, args.gallery, query=args.query, data=args.data,
                                       classes=args.classes, device=args.device, batch_size=args.batch_size)
        print(format_gallery_report(result))
        if args.json:
            print(f"wrote {write_json(args.json, result)}")
        return 0
    result = compatibility(args.checkpoints, query=args.query, gallery=args.gallery, data=args.data,
                           classes=args.classes, device=args.device, batch_size=args.batch_size, metric=args.metric,
                           pairs=args.pairs, folds=args.folds, pair_seed=args.pair_seed)
    png = args.png or (args.json.with_suffix(".png") if args.json else Path("compat.png"))
    report(result, json_path=args.json, png_path=png)
    if args.logger != "none":
        from omegaconf import OmegaConf

        path, state = load_checkpoint(args.checkpoints[0])
        # The project and tags come from the checkpoint (as text); files go only where this command writes.
        logger_cfg = OmegaConf.merge(stored_config(state, path).logger, {"name": args.logger, "dir": None})
        log_to_tracker(result, logger_cfg, (args.json or png).parent, png, state["config"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
