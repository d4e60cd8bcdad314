"""fixedcls-embed: index a retrieval gallery once, with the model of today, and keep it.

    fixedcls-embed CKPT [--split train|test|val | PATH...] --out FILE.safetensors [--data NAME|KEY=VALUE ...]

Stores the L2-normalised head-input features, the labels (a split's own; for image files, the class named by
the parent folder, else -1), the sample paths and the model's identity. A later model generation searches it
with `fixedcls-compat NEW_CKPT --gallery FILE`, without re-indexing.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..escaping import terminal
from .cli import EXIT_USAGE, output_file, positive_int, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fixedcls-embed", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", metavar="CKPT", help="a checkpoint, a run's checkpoint folder, or a fixedcls export")
    parser.add_argument("paths", nargs="*", metavar="PATH", help="image files or folders (instead of --split)")
    parser.add_argument("--split", choices=("train", "test", "val"), help="a split of the run's data (default train, without PATHs)")
    parser.add_argument("--out", type=output_file, required=True, help="the gallery file to write (.safetensors)")
    parser.add_argument("--data", nargs="+", default=[], metavar="NAME|KEY=VALUE",
                        help="change the run's data (a conf/data preset and/or data keys), e.g. --data root=/data/mine")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--ema", action="store_true", help="embed with the EMA weights")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=positive_int, help="default: the run's data.eval_batch_size (64 for files)")
    return parser


def embed_split(loaded, split: str, data_items: Sequence[str], device, batch_size: Optional[int]):
    """The gallery of a split of the model's own data, all classes (as fixedcls-compat embeds it)."""
    from ..compatibility.gallery import Gallery, sample_paths
    from ..compatibility.matrix import embed
    from ..data.datasets import create_data, evaluation_split
    from ..errors import FixedclsError
    from ..runs import stored
    from ..runs.stored import evaluation_data_config

    if not loaded.config:
        raise FixedclsError(f"{loaded.path} stores no training config, so its data is unknown: embed image files (PATH...)")
    cfg = stored.stored_config({"config": loaded.config}, loaded.path)
    data_cfg = evaluation_data_config(cfg.data, data_items)
    bundle = create_data(data_cfg)
    dataset = evaluation_split(bundle, split)
    features, labels = embed(loaded.model, dataset, device=device, batch_size=int(batch_size or data_cfg.eval_batch_size))
    return Gallery(features=features, labels=labels, paths=sample_paths(dataset, split),
                   class_names=list(loaded.class_names), identity=loaded.identity, source=f"{data_cfg.name}:{split}")


def embed_files(loaded, paths: Sequence[str], device, batch_size: Optional[int], on_error):
    """The gallery of image files; each unreadable file goes to `on_error(path, message)` and is left out."""
    import torch
    import torch.nn.functional as F

    from ..compatibility.gallery import Gallery, labels_from_folders
    from ..errors import FixedclsError
    from ..inference.loading import find_images, image_batches

    files = find_images(paths)
    if not files:
        raise FixedclsError(f"no image files in {', '.join(map(str, paths))}: give image files or folders of images")
    kept, features = [], []
    with torch.no_grad():
        for names, batch in image_batches(files, loaded.transform, batch_size or 64, on_error):
            features.append(F.normalize(loaded.model.forward_features(batch.to(device)).float(), dim=1).cpu())
            kept += names
    if not kept:
        raise FixedclsError("none of the files could be read as images: nothing to embed")
    return Gallery(features=torch.cat(features), labels=labels_from_folders(kept, list(loaded.class_names)),
                   paths=[str(p) for p in kept], class_names=list(loaded.class_names), identity=loaded.identity,
                   source="files")


def _run(args) -> int:
    from ..compatibility.gallery import save_gallery
    from ..errors import FixedclsError
    from ..inference.loading import load
    from ..runtime import resolve_device

    if args.paths and args.split:
        raise FixedclsError("give either --split or image PATHs, not both")
    if args.out.exists() and not args.force:
        raise FixedclsError(f"{args.out} already exists: choose another --out, or pass --force to replace it")
    device = resolve_device(args.device, key="--device")
    loaded = load(args.checkpoint, device=device, ema=args.ema)
    loaded.identity["ema"] = bool(args.ema)
    skipped = []

    def report(path: Path, message: str) -> None:
        skipped.append(path)
        print(f"fixedcls-embed: skipped: {terminal(message)}", file=sys.stderr)

    if args.paths:
        gallery = embed_files(loaded, args.paths, device, args.batch_size, report)
    else:
        gallery = embed_split(loaded, args.split or "train", args.data, device, args.batch_size)
    save_gallery(gallery, args.out)
    print(f"{len(gallery.paths)} samples of {terminal(gallery.source)} embedded by {terminal(loaded.path)} "
          f"(d={gallery.features.shape[1]}): {terminal(args.out)}")
    if skipped:
        print(f"fixedcls-embed: {len(skipped)} files skipped (not readable images)", file=sys.stderr)
        return EXIT_USAGE
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return run_command(lambda: _run(args), prog="fixedcls-embed")


if __name__ == "__main__":
    sys.exit(main())
