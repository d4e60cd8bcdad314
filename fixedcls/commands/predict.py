"""fixedcls-predict: the top classes of image files under a trained model.

    fixedcls-predict CKPT PATH... [--topk K] [--out FILE.csv] [--batch-size B]

PATH: image files, or folders searched recursively for images. A first line names the checkpoint used (for a
run's folder: the file chosen in it), then one line per image; with --out, a CSV whose columns are the image
path, then the top-k class names and probabilities. A file that cannot be read is
reported in one line and skipped, and the exit code is then 2 (0 when every image was classified).
"""
from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..escaping import csv_cell, terminal
from .cli import EXIT_USAGE, output_file, positive_int, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fixedcls-predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", metavar="CKPT", help="a checkpoint, a run's checkpoint folder, or a folder "
                                                           "written by fixedcls-export --format fixedcls")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images (recursive)")
    parser.add_argument("--topk", type=positive_int, default=5, help="classes per image (default 5, at most K)")
    parser.add_argument("--out", type=output_file, help="also write the predictions to this CSV file")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--ema", action="store_true", help="use the EMA weights (trainer.ema=true runs)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return parser


def predict_files(checkpoint, paths: Sequence[str | Path], *, topk: int = 5, batch_size: int = 64, device: str = "auto",
                  ema: bool = False, on_error=None, on_load=None) -> list[tuple[Path, list[tuple[str, float]]]]:
    """(image file, its top-k (class name, probability) pairs) for every readable image of `paths`;
    `on_error(path, message)` hears about each unreadable one, `on_load(loaded)` about the model once loaded
    (a checkpoint folder names its newest good file only then)."""
    import torch

    from ..data.datasets import IMAGE_EXTENSIONS
    from ..errors import FixedclsError
    from ..inference.loading import find_images, image_batches, load
    from ..runtime import resolve_device

    files = find_images(paths)
    if not files:
        raise FixedclsError(f"no image files in {', '.join(map(str, paths))}: give image files, or folders holding "
                            f"{', '.join(IMAGE_EXTENSIONS)} files")
    dev = resolve_device(device, key="--device")
    loaded = load(checkpoint, device=dev, ema=ema)
    if on_load is not None:
        on_load(loaded)
    results = []
    with torch.no_grad():
        for names, batch in image_batches(files, loaded.transform, batch_size, on_error or (lambda path, message: None)):
            results += zip(names, loaded.top_classes(loaded.model(batch.to(dev)), topk))
    return results


def write_csv(results, path: Path, topk: int) -> None:
    """The predictions as CSV, written atomically (atomic.write_text_atomic), so a failed run leaves no half file;
    file and class names that a spreadsheet would run as a formula are escaped (escaping.csv_cell)."""
    import io

    from ..atomic import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    k = max((len(top) for _, top in results), default=topk)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["path"] + [col for r in range(1, k + 1) for col in (f"class_{r}", f"prob_{r}")])
    for file, top in results:
        writer.writerow([csv_cell(str(file))] + [cell for name, p in top for cell in (csv_cell(name), f"{p:.6f}")])
    write_text_atomic(path, text.getvalue())


def _run(args) -> int:
    skipped = []

    def report(path: Path, message: str) -> None:
        skipped.append(path)
        print(f"fixedcls-predict: skipped: {terminal(message)}", file=sys.stderr)

    def name_the_model(loaded) -> None:
        epoch = loaded.identity.get("epoch")
        print(f"{terminal(loaded.path)} ({f'epoch {epoch}, ' if epoch else ''}{'EMA weights, ' if args.ema else ''}"
              f"{len(loaded.class_names)} classes)")

    results = predict_files(args.checkpoint, args.paths, topk=args.topk, batch_size=args.batch_size,
                            device=args.device, ema=args.ema, on_error=report, on_load=name_the_model)
    for path, top in results:
        print(f"{terminal(path)}: " + ", ".join(f"{terminal(name)} {100 * p:.1f}%" for name, p in top))
    if args.out:
        write_csv(results, args.out, args.topk)
        print(f"{len(results)} predictions: {terminal(args.out)}")
    if skipped:
        print(f"fixedcls-predict: {len(skipped)} of {len(skipped) + len(results)} files skipped (not readable images)",
              file=sys.stderr)
        return EXIT_USAGE
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return run_command(lambda: _run(args), prog="fixedcls-predict")


if __name__ == "__main__":
    sys.exit(main())
