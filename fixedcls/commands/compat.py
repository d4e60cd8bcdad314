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

The measures, reports and generations live in `fixedcls.compatibility`.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..atomic import write_json
from ..compatibility.generations import run_generations
from ..compatibility.matrix import METRICS, SPLITS, compatibility, gallery_compatibility
from ..compatibility.report import format_gallery_report, log_to_tracker, report
from ..config import conf_dir
from ..errors import FixedclsError
from ..runs.rebuild import load_checkpoint
from ..runs.stored import stored_config
from .cli import exit_if_jobs_failed, hydra_usage_errors, output_file, positive_int, refuse_bad_overrides, run_command, run_job


def _generations_hydra_main():
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from ..config import register_configs

    register_configs()

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
    def generations_main(cfg):
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        return run_job(lambda: run_generations(cfg, run_dir).get("AM"), prog="fixedcls-compat")

    with hydra_usage_errors():
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
