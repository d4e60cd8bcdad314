"""fixedcls-eval: how well a trained model classifies one split of its data.

    fixedcls-eval CKPT [--split test|val|train] [--data NAME|KEY=VALUE ...] [--ema] [--json FILE] [--png FILE]
                       [--ood FOLDER|NAME|KEY=VALUE ... [--neco-dim N]]

Loss, top-1, top-5 (more than 5 classes), balanced accuracy, ECE, per-class accuracy and the split's collapse
measures on the terminal; with --json also the confusion matrix, and its heatmap as a PNG next to it.
With --ood, the split against out-of-distribution data: AUROC and FPR at 95% TPR of the MSP, max-logit,
energy and NECO scores, and nc5 (fixedcls.inference.ood).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from ..escaping import terminal
from .cli import output_file, positive_int, run_command

COLLAPSE_PREFIX = {"train": "collapse/", "test": "collapse_test/", "val": "collapse_val/"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fixedcls-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", metavar="CKPT", help="a checkpoint, a run's checkpoint folder, or a folder "
                                                           "written by fixedcls-export --format fixedcls")
    parser.add_argument("--split", choices=("test", "val", "train"), default="test", help="the split to evaluate (default test)")
    parser.add_argument("--data", nargs="+", default=[], metavar="NAME|KEY=VALUE",
                        help="change the run's data: a conf/data preset and/or data keys (e.g. --data root=/data/mine)")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights (trainer.ema=true runs)")
    parser.add_argument("--json", type=output_file, help="write every figure and the confusion matrix here")
    parser.add_argument("--png", type=output_file, help="confusion-matrix heatmap (default: next to --json)")
    parser.add_argument("--no-collapse", action="store_true", help="skip the collapse measures (a second pass)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=positive_int, help="default: the run's data.eval_batch_size")
    parser.add_argument("--ood", nargs="+", default=None, metavar="FOLDER|NAME|KEY=VALUE",
                        help="out-of-distribution data: a folder of images, or a conf/data preset and/or data keys "
                             "applied to the run's data like --data (its test split)")
    parser.add_argument("--neco-dim", type=positive_int, default=None, metavar="N",
                        help="principal components of the training features for NECO (default: classes - 1, at most d)")
    return parser


def evaluate_checkpoint(args) -> dict:
    """Every figure of `args.split` for the model of `args.checkpoint` (the command's work, without printing)."""
    from torch.utils.data import DataLoader

    from ..collapse import measure_model
    from ..data.datasets import create_data, evaluation_split
    from ..errors import FixedclsError
    from ..inference.loading import load
    from ..inference.metrics import classification_metrics, collect_logits
    from ..runs import stored
    from ..runs.stored import evaluation_data_config
    from ..runtime import resolve_device
    from ..training import factories

    if args.neco_dim is not None and not args.ood:
        raise FixedclsError("--neco-dim sets NECO's principal components of OOD detection: add --ood DATA, or leave --neco-dim out")
    device = resolve_device(args.device, key="--device")
    loaded = load(args.checkpoint, device=device, ema=args.ema)
    if not loaded.config:
        raise FixedclsError(f"{loaded.path} stores no training config, so its data is unknown: evaluate the checkpoint itself")
    cfg = stored.stored_config({"config": loaded.config}, loaded.path)
    cfg.data = evaluation_data_config(cfg.data, args.data, all_classes=False)
    bundle = create_data(cfg.data)
    dataset = evaluation_split(bundle, args.split)
    if bundle.in_chans != loaded.spec["in_chans"]:
        raise FixedclsError(f"the model takes {loaded.spec['in_chans']}-channel images but this data has {bundle.in_chans}: "
                            f"set --data in_chans={loaded.spec['in_chans']}")
    loader = DataLoader(dataset, batch_size=args.batch_size or cfg.data.eval_batch_size, shuffle=False,
                        num_workers=cfg.data.num_workers)
    criterion = factories.build_criterion(cfg, loaded.model)
    logits, labels, loss = collect_logits(loaded.model, loader, criterion, device)
    metrics = classification_metrics(logits, labels, loss, loaded.class_names)
    collapse = {}
    if not args.no_collapse:
        collapse = {COLLAPSE_PREFIX[args.split] + key: value
                    for key, value in measure_model(loaded.model, loader, device=device).items()}
    result = {"checkpoint": str(loaded.path), "epoch": loaded.identity.get("epoch"), "ema": bool(args.ema),
              "split": args.split, "data": cfg.data.name, "num_classes": len(loaded.class_names),
              "class_names": loaded.class_names, **metrics, "collapse": collapse}
    if args.ood:
        from ..inference.ood import detect_ood, ood_dataset

        ood_data, source = ood_dataset(args.ood, cfg.data, loaded.preprocessing, what="--ood")
        batch_size = args.batch_size or cfg.data.eval_batch_size

        def batches(data):
            return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=cfg.data.num_workers)

        report = detect_ood(loaded.model, loader, batches(ood_data), batches(bundle.train_eval), device=device,
                            components=args.neco_dim)
        result["ood"] = {"source": source, **report}
    return result


def _run(args) -> int:
    from ..atomic import write_json
    from ..inference.metrics import format_metrics, plot_confusion

    result = evaluate_checkpoint(args)
    print(f"{terminal(result['checkpoint'])} (epoch {result['epoch']}{', EMA' if result['ema'] else ''}): {result['data']} "
          f"{result['split']} split, {result['samples']} samples, {result['num_classes']} classes")
    print(format_metrics(result, result["collapse"]))
    if "ood" in result:
        from ..inference.ood import format_ood

        ood = result["ood"]
        print(format_ood(ood, f"OOD detection: {result['split']} split ({ood['id_samples']}) against {ood['source']}"))
    png = args.png or (args.json.with_suffix(".png") if args.json else None)
    if png is not None:
        plot_confusion(result["confusion"], result["class_names"], png,
                       f"{result['data']} {result['split']}: top-1 {100 * result['acc']:.2f}%")
        print(f"confusion matrix: {png}")
    if args.json:
        write_json(args.json, result)
        print(f"figures: {args.json}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return run_command(lambda: _run(args), prog="fixedcls-eval")


if __name__ == "__main__":
    sys.exit(main())
