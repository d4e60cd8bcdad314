"""Model generations (CoReS / CL2R): the classes each generation adds, one training config per
generation, and `run_generations`, which trains them in sequence and measures their compatibility.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

from ..atomic import write_json
from ..errors import FixedclsError
from ..escaping import shell_path
from ..runs import checkpoints as ckpt
from ..runs import folders as runs
from ..runs.identity import run_identity
from ..runs.stored import evaluation_data_config, plain_config
from ..runtime import choice
from .criteria import split_classes
from .matrix import METRICS, compatibility
from .report import format_criteria, log_to_tracker, matrices_of, report

log = logging.getLogger("fixedcls")

PROTOCOLS = ("cumulative", "finetune")

GENERATION_CHECKPOINTS = ("last", "best")


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
    from ..data.datasets import create_data

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
    from ..training.assemble import train

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
    # The last lines say what the run made, after anything the tracker printed on finishing.
    log.info(f"compat.json  {shell_path(run_dir / 'compat.json')}")
    for _, suffix, _, name in matrices_of(result):
        log.info(f"criteria ({name})  {format_criteria(result, suffix)}")
    return result
