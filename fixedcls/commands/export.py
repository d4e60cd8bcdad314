"""fixedcls-export: take a trained model out of fixedcls.

    fixedcls-export CKPT --out DIR [--format timm|fixedcls|onnx|torchscript] [--ema] [--force]

timm (default): a plain timm model, timm.create_model("local-dir:DIR", pretrained=True), the fixed head folded
into timm's classifier (heads without feature normalisation); fixedcls: a folder fixedcls.load reads (every
head); onnx, torchscript: the logits. Every export is checked against the model's logits before it is kept.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..escaping import terminal
from .cli import output_folder, run_command

FORMATS = ("timm", "fixedcls", "onnx", "torchscript")  # fixedcls.export.FORMATS, without importing torch for --help


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fixedcls-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", metavar="CKPT", help="a checkpoint, a run's checkpoint folder, or a fixedcls export")
    parser.add_argument("--out", type=output_folder, required=True, help="the folder to write (refused if it exists)")
    parser.add_argument("--format", choices=FORMATS, default="timm", help="default timm")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (trainer.ema=true runs)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    return parser


def _run(args) -> int:
    from ..inference.formats import export
    from ..inference.loading import load

    loaded = load(args.checkpoint, ema=args.ema)
    result = export(loaded, args.out, args.format, force=args.force)
    files = ", ".join(sorted(p.name for p in Path(result["out"]).iterdir()))
    print(f"exported {terminal(loaded.path)} as {args.format} to {terminal(result['out'])} ({terminal(files)}); logits match the model's to "
          f"{result['rel_diff']:.1e} relative (max |diff| {result['max_abs_diff']:.1e})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return run_command(lambda: _run(args), prog="fixedcls-export")


if __name__ == "__main__":
    sys.exit(main())
