"""``python -m fixedcls.collapse CHECKPOINT``: measure a saved model on its own data and print the table."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..atomic import write_json
from ..collapse.measure import measure_model
from ..collapse.report import format_table
from ..data.datasets import targets_of
from ..data.imbalance import class_counts, class_groups
from ..runs.rebuild import load_trained
from ..runtime import resolve_device
from .cli import output_file, positive_int, run_command, stage_list


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fixedcls.collapse", description=__doc__)
    parser.add_argument("checkpoint", help="a .pt file written by fixedcls-train (last.pt, best.pt, epoch_NNNN.pt), "
                                           "or a run's checkpoint folder (its newest good checkpoint)")
    parser.add_argument("--split", choices=("train", "test", "both"), default="both")
    parser.add_argument("--max-samples", type=positive_int, default=None, help="measure a seeded subset of at most N samples")
    parser.add_argument("--layers", type=stage_list, default=None, help="backbone stages for deep collapse, e.g. 0,1,2,3 or all")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--data-root", default=None, help="where the run's dataset lives on this machine")
    parser.add_argument("--agop", type=stage_list, nargs="?", const="all", default=None, metavar="STAGES",
                        help="also the per-stage AGOP measures (docs/agop.md), exact, on the train split: "
                             "stages such as 1,2,3,4 (default all)")
    parser.add_argument("--agop-samples", type=positive_int, default=512, help="seeded subset size for --agop")
    parser.add_argument("--ood", nargs="+", default=None, metavar="FOLDER|NAME|KEY=VALUE",
                        help="out-of-distribution data for nc5: a folder of images, or a conf/data preset and/or "
                             "data keys applied to the run's data (its test split)")
    parser.add_argument("--json", type=output_file, default=None, help="also write the measures to this JSON file")
    return parser


def measure(args) -> int:
    from torch.utils.data import DataLoader

    device = resolve_device(args.device, key="--device")
    model, cfg, bundle = load_trained(args.checkpoint, data_overrides={"root": args.data_root} if args.data_root else None)
    model.to(device)
    splits = {"train": bundle.train_eval, "test": bundle.test}
    prefixes = {"train": "collapse/", "test": "collapse_test/"}
    # The run's class groups (a long-tailed run's few-shot classes are the minority of the minority measures).
    groups = class_groups(class_counts(targets_of(bundle.train), model.num_classes), cfg.data.imbalance)
    results: dict = {}
    ood = None
    if args.ood:
        from ..collapse.measure import ood_feature_sums
        from ..inference.ood import ood_loader

        loader, _ = ood_loader(args.ood, cfg.data, bundle.preprocessing, batch_size=cfg.data.eval_batch_size, what="--ood")
        ood = ood_feature_sums(model, loader, device=device)
    for split in (("train", "test") if args.split == "both" else (args.split,)):
        loader = DataLoader(splits[split], batch_size=cfg.data.eval_batch_size, shuffle=False)
        values = measure_model(model, loader, device=device, max_samples=args.max_samples, layers=args.layers,
                               minority=groups["few"], majority=groups["many"], ood=ood)
        results.update({prefixes[split] + key: value for key, value in values.items()})
    if args.agop is not None:
        from .. import agop

        layers = agop.representative_layers(model, args.agop)
        results.update(agop.measure_agop(model, DataLoader(bundle.train_eval, batch_size=cfg.data.eval_batch_size),
                                         layers, samples=args.agop_samples, probes="exact"))
    print(f"{args.checkpoint}: {cfg.head.name} head on {cfg.model.backbone}, {cfg.data.name}")
    print(format_table(results))
    if args.json:
        write_json(args.json, results)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: measure(args), prog="python -m fixedcls.collapse")


if __name__ == "__main__":
    sys.exit(main())
