"""Model generations (CoReS / CL2R / IAM-CL2R): the classes each generation adds, one training config per
generation, the generations replaced by an independently trained model (`replacement_plan`), and
`run_generations`, which trains them in sequence and measures their compatibility.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

from omegaconf import OmegaConf

from ..atomic import write_json
from ..config import checked_fields, uses_old_model, value_problem
from ..errors import FixedclsError
from ..escaping import shell_path
from ..runs import checkpoints as ckpt
from ..runs import folders as runs
from ..runs.identity import run_identity
from ..runs.rebuild import load_checkpoint
from ..runs.stored import evaluation_data_config, plain_config, stored_config
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


def replacement_plan(cfg, count: int) -> dict[int, str | None]:
    """The generations of generations.replace (counting from 1) with what replaces each: the checkpoint of
    generations.replace_with at the same place, or None (a model trained from scratch on all classes seen so far)."""
    g = cfg.generations
    replace = [int(t) for t in (g.replace or [])]
    sources = [str(s) for s in (g.replace_with or [])]
    if not replace:
        if sources:
            raise FixedclsError(f"generations.replace_with lists {len(sources)} checkpoint(s) but generations.replace names "
                                "no generation: name the generations they replace, e.g. generations.replace=[3]")
        return {}
    if g.protocol != "finetune":
        raise FixedclsError(f"generations.replace={replace} replaces the model a generation starts from, but protocol="
                            f"{g.protocol} trains every generation from scratch: set generations.protocol=finetune")
    if len(set(replace)) != len(replace):
        raise FixedclsError(f"generations.replace={replace} names a generation twice: name each once")
    beyond = [t for t in replace if not 2 <= t <= count]
    if beyond:
        raise FixedclsError(f"generations.replace={replace} names generation {beyond[0]}, but the protocol has {count} "
                            f"generations: name generations 2 to {count} (generation 1 has no earlier model; start it "
                            f"from a checkpoint with model.init_from)")
    if sources and len(sources) != len(replace):
        raise FixedclsError(f"generations.replace_with has {len(sources)} checkpoint(s) for the {len(replace)} generations "
                            f"of generations.replace={replace}: give one per replaced generation, or [] to train each "
                            f"replacement from scratch")
    return dict(zip(replace, sources or [None] * len(replace)))


def _replacement_model(cfg, source: str, where: str, classes: int) -> tuple[str, object, str]:
    """(backbone, model.dim, file) of a replacement checkpoint, after checking that it fits the protocol: the same
    head (and, for a fixed head, the same prototypes), head settings, class count (`classes`: the data's K) and
    image channels."""
    from ..models.classifier import in_chans_of
    from ..models.heads import HEADS_LEARNED, create_head

    try:
        path, state = load_checkpoint(source)
        old = stored_config(state, path)
    except FixedclsError as error:
        raise FixedclsError(f"{where}: {error}") from None
    where = f"{where}={path}"
    if old.head.name != cfg.head.name:
        raise FixedclsError(f"{where} holds a model of head {old.head.name}, but this protocol trains head {cfg.head.name}: "
                            f"replace with a model of the same head (trained against the same prototypes)")
    for key in ("normalize", "scale", "learn_scale", "bias", "feature_bn"):
        mine, theirs = cfg.head.get(key), old.head.get(key)
        if str(getattr(mine, "value", mine)) != str(getattr(theirs, "value", theirs)):
            raise FixedclsError(f"{where} was trained with head.{key}={theirs}, this protocol has head.{key}={mine}: "
                                f"replace with a model of the same head settings, or set head.{key}={theirs}")
    if in_chans_of(old) != in_chans_of(cfg):
        raise FixedclsError(f"{where} takes {in_chans_of(old)}-channel images, this protocol's data has "
                            f"{in_chans_of(cfg)}: replace with a model of the same input")
    outputs = int(cfg.head.num_prototypes or classes) if cfg.head.name not in HEADS_LEARNED else classes
    saved = ckpt.meta_of(state).get("num_classes")
    if saved is not None and int(saved) != outputs:
        raise FixedclsError(f"{where} has {saved} outputs but this protocol's head has {outputs}: replace with a model "
                            f"of the same class count (head.num_prototypes)")
    if cfg.head.name not in HEADS_LEARNED:
        reference = create_head(cfg.head.name, classes, cfg.model.dim, seed=int(cfg.head.seed),
                                num_prototypes=cfg.head.num_prototypes)
        try:  # the head's own check, with its explanation of which prototypes the file holds
            reference.load_state_dict({"prototypes": state["model"]["head.prototypes"]}, strict=False)
        except FixedclsError as error:
            raise FixedclsError(f"{where} was trained against other prototypes ({error})") from None
        except KeyError:
            raise FixedclsError(f"{where} holds no head.prototypes: replace with a model of a fixed head") from None
    return str(old.model.backbone), old.model.dim, str(path)


def _without_old_model(c) -> None:
    """Turn off every loss that learns from an old model (a generation that has none)."""
    c.trainer.distill_weight = 0.0
    c.trainer.bct_weight = 0.0
    c.trainer.hoc_lambda = 1.0
    c.trainer.old_model = None


def generation_configs(cfg) -> list:
    """One fixedcls-train config per generation of cfg.generations (checkpoint dirs set by the caller). A generation
    replaced by a checkpoint starts from it (model.init_from) with its backbone; one replaced by a model trained
    from scratch gets its model.init_from from `run_generations`, which trains that model first."""
    g = cfg.generations
    for key in checked_fields():
        if key.startswith("generations."):
            problem = value_problem(key, OmegaConf.select(cfg, key, throw_on_missing=False))
            if problem is not None:
                raise FixedclsError(problem)
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
    explicit = list(g.backbones) if g.backbones else None
    if explicit is not None and len(explicit) != len(tasks):
        raise FixedclsError(f"generations.backbones has {len(explicit)} names for {len(tasks)} generations: give one per generation")
    if cfg.data.classes is not None or cfg.data.old_classes is not None:
        raise FixedclsError("data.classes / data.old_classes are set per generation from generations.tasks: leave them unset")
    if g.protocol == "cumulative" and (cfg.data.rehearsal or uses_old_model(cfg.trainer)):
        raise FixedclsError("data.rehearsal and the losses against an old model (trainer.distill_weight, distill_loss=hoc, "
                            "bct_weight) apply to generations.protocol=finetune (cumulative trains on all data seen so "
                            "far): set protocol=finetune, or leave them off (0; hoc_lambda=1)")
    if cfg.resume not in (None, "auto"):
        raise FixedclsError(f"resume={cfg.resume}: a sequence of generations continues with resume=auto only")
    plan = replacement_plan(cfg, len(tasks))
    # counted once for every replacement checkpoint: without data.num_classes that loads the dataset
    classes = _num_classes(cfg) if any(source is not None for source in plan.values()) else None
    configs, seen = [], []
    base_name = str(cfg.name)
    backbone, dim = str(cfg.model.backbone), cfg.model.dim
    for t, task in enumerate(tasks, 1):
        c = copy.deepcopy(cfg)
        c.name = f"{base_name}-gen{t}"
        c.seed = int(cfg.seed) + t - 1  # generations are trained apart: no shared initialisation or data order
        chained = g.protocol == "finetune" and t > 1 and t not in plan  # starts from the previous generation
        if plan.get(t) is not None:
            where = f"generations.replace_with[{list(plan).index(t)}]"
            backbone, dim, c.model.init_from = _replacement_model(cfg, plan[t], where, classes)
            if explicit is not None and explicit[t - 1] != backbone:
                raise FixedclsError(f"generations.backbones names {explicit[t - 1]} for generation {t}, but its replacement "
                                    f"{plan[t]} is a {backbone}: name {backbone} there, or drop generations.backbones")
        elif explicit is not None:
            if chained and explicit[t - 1] != backbone:
                raise FixedclsError(f"generations.backbones changes the backbone at generation {t} ({backbone} -> "
                                    f"{explicit[t - 1]}), which starts from generation {t - 1} (protocol=finetune): change "
                                    f"it only at a generation of generations.replace, or use protocol=cumulative")
            backbone, dim = str(explicit[t - 1]), cfg.model.dim
        c.model.backbone, c.model.dim = backbone, dim
        if backbone != str(cfg.model.backbone) and (t in plan or chained):
            # weights come from a checkpoint: the pretrained weights of model.backbone do not fit this backbone
            c.model.pretrained, c.model.pretrained_file = False, None
        if g.protocol == "cumulative":
            c.data.classes = sorted(seen + task)
        else:
            c.data.classes = task
            c.data.old_classes = sorted(seen) or None
            c.data.rehearsal = cfg.data.rehearsal if seen else 0
            if not seen and not cfg.model.init_from:  # generation 1 has an old model only in model.init_from
                _without_old_model(c)
        configs.append(c)
        seen += task
    return configs


def replacement_configs(cfg, configs: list) -> dict:
    """{t: the config of the model that replaces generation t} for the generations replaced from scratch: the
    generation's own config on every class seen so far (this generation's included), all their training data, no
    memory, no earlier model (checkpoint dirs set by the caller)."""
    plan = replacement_plan(cfg, len(configs))
    replacements = {}
    for t, source in plan.items():
        if source is not None:
            continue
        r = copy.deepcopy(configs[t - 1])
        r.name = f"{cfg.name}-gen{t}-replacement"
        r.data.classes = sorted({int(c) for c in r.data.classes} | {int(c) for c in (r.data.old_classes or [])})
        r.data.old_classes, r.data.rehearsal = None, 0
        r.model.init_from = None
        _without_old_model(r)
        replacements[t] = r
    return replacements


def _trained_file(c, chosen: str, what: str) -> Path:
    path = Path(c.checkpoint.dir) / chosen
    if not path.is_file():
        raise FixedclsError(f"{what} wrote no {chosen}: checkpoint.best_metric={c.checkpoint.best_metric} "
                            "was never measured; name a logged metric (e.g. test/acc) or set generations.checkpoint=last")
    return path


def run_generations(cfg, run_dir: str | Path) -> dict:
    """Train the generations of cfg.generations in sequence, then measure their compatibility.

    Writes <run_dir>/gen<t>/ (each generation's run), <run_dir>/generations.json, compat.json and compat.png;
    checkpoints go to <checkpoint dir>/gen<t>/. Generation t runs with seed + t - 1 (models trained apart).
    generations.checkpoint picks the file measured and fine-tuned from: last.pt, or best.pt (checkpoint.best_metric).
    A generation of generations.replace starts from its replacement: the checkpoint of generations.replace_with,
    or a model trained first from scratch on every class seen so far (<run_dir>/gen<t>-replacement/, checkpoints
    in <checkpoint dir>/gen<t>-replacement/); its old model (HOC, BCT, distillation) is the previous generation
    (generations.replace_old_model=previous) or the replacement itself (replacement).
    With resume=auto finished generations (and replacements) are not trained again.
    """
    from ..training.assemble import train

    run_dir = Path(run_dir)
    g = cfg.generations
    configs = generation_configs(cfg)
    plan = replacement_plan(cfg, len(configs))
    scratch = replacement_configs(cfg, configs)
    chosen = ckpt.BEST if g.checkpoint == "best" else ckpt.LAST
    base = _generations_dir(cfg)
    log.info(f"{len(configs)} generations ({g.protocol}), {cfg.head.name} head; checkpoints in {base}/gen<t>"
             + (f"; generations {sorted(plan)} replaced" if plan else ""))
    paths, rows, replaced = [], [], []
    for t, c in enumerate(configs, 1):
        c.checkpoint.dir = str(base / f"gen{t}")
        if t in scratch:
            r = scratch[t]
            r.checkpoint.dir = str(base / f"gen{t}-replacement")
            log.info(f"generation {t}/{len(configs)} is replaced: training its replacement from scratch on classes "
                     f"{list(r.data.classes)}")
            train(r, run_dir / f"gen{t}-replacement")
            c.model.init_from = str(_trained_file(r, chosen, f"the replacement of generation {t}"))
        elif g.protocol == "finetune" and t > 1 and t not in plan:
            c.model.init_from = str(paths[-1])
        if t in plan and g.replace_old_model == "previous" and uses_old_model(c.trainer):
            c.trainer.old_model = str(paths[-1])
        old_model = (c.trainer.old_model or c.model.init_from) if uses_old_model(c.trainer) else None
        if t in plan:
            replaced.append({"generation": t, "from": "scratch" if plan[t] is None else plan[t],
                             "checkpoint": c.model.init_from, "backbone": c.model.backbone,
                             "classes": list(scratch[t].data.classes) if t in scratch else None, "old_model": old_model})
        log.info(f"generation {t}/{len(configs)}: classes {list(c.data.classes)}"
                 + (f" + memory of {c.data.rehearsal} per old class" if c.data.rehearsal else "")
                 + (f", from {c.model.init_from}" if c.model.init_from else ", from scratch")
                 + (f", learning from the frozen {old_model}" if old_model else ""))
        summary = train(c, run_dir / f"gen{t}")
        paths.append(_trained_file(c, chosen, f"generation {t}"))
        rows.append({"generation": t, "classes": list(c.data.classes),
                     "old_classes": list(c.data.old_classes) if c.data.old_classes is not None else None,
                     "backbone": c.model.backbone, "seed": int(c.seed), "checkpoint": str(paths[-1]),
                     "init_from": c.model.init_from, "old_model": old_model,
                     "replaced_from": None if t not in plan else ("scratch" if plan[t] is None else plan[t]),
                     "test_acc": summary.get("final/test/acc")})
    if int(os.environ.get("RANK", "0")) != 0:
        return {"generations": rows}
    write_json(run_dir / "generations.json",
               {"protocol": g.protocol, "head": cfg.head.name, "replaced": replaced, "generations": rows})
    result = compatibility(paths, query=g.query, gallery=g.gallery, data=list(g.eval_data), metric=g.metric,
                           pairs=int(g.pairs), folds=int(g.folds), pair_seed=int(cfg.seed),
                           device=choice(cfg.trainer.device))
    result["protocol"] = g.protocol
    result["replaced"] = [entry["generation"] for entry in replaced]
    result["test_acc"] = [row["test_acc"] for row in rows]
    title = f"{cfg.head.name} head, {g.protocol}, {cfg.data.name}" + (f", replaced {result['replaced']}" if replaced else "")
    report(result, json_path=run_dir / "compat.json", png_path=run_dir / "compat.png", title=title, echo=log.info)
    log_to_tracker(result, cfg.logger, run_dir, run_dir / "compat.png", plain_config(cfg))
    # The last lines say what the run made, after anything the tracker printed on finishing.
    log.info(f"compat.json  {shell_path(run_dir / 'compat.json')}")
    for _, suffix, _, name in matrices_of(result):
        log.info(f"criteria ({name})  {format_criteria(result, suffix)}")
    return result
