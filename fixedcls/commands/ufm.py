"""``python -m fixedcls.ufm``: simulate the UFM for given counts and heads, print it beside the theory.

For every (counts, head) pair: one :func:`~fixedcls.ufm.simulate` run, its exact optimum from
:func:`~fixedcls.ufm.global_optimum`, a table row with both end states, and the run's collapse
curves drawn by :func:`fixedcls.collapse.plot_collapse` (the training runs' plot; its x axis,
labelled "epoch" there, is the optimizer step here).  With more than one run, a comparison
figure (:func:`~fixedcls.ufm.plot.plot_heads`) too.  Usage errors exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence

from .. import polytopes
from ..collapse import plot_collapse
from ..errors import FixedclsError
from ..ufm._checks import LOSSES, NORMALIZATIONS, parse_counts
from ..ufm.closed_form import minority_collapse_threshold
from ..ufm.plot import plot_heads
from ..ufm.simulate import OPTIMIZERS, simulate
from ..ufm.theory import global_optimum, minority_spread
from .cli import run_command

_SHOWN = ("nc1", "nc2_etf_error", "nc3", "proto_cos")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fixedcls.ufm",
        description="Simulate the unconstrained-features model and compare its end state with the exact optimum.",
    )
    p.add_argument("--counts", nargs="+", default=["10x10"], metavar="SPEC",
                   help="class counts, one setting per SPEC: KxN (K classes of N), joined by commas, e.g. 5x100,5x2")
    p.add_argument("--heads", nargs="+", default=["learned"], choices=("learned", *polytopes.available()),
                   metavar="HEAD", help="learned or a fixed polytope: " + ", ".join(polytopes.available()))
    p.add_argument("--loss", default="ce", choices=LOSSES)
    p.add_argument("--lambda-w", type=float, default=5e-3, help="weight decay on W (learned head)")
    p.add_argument("--lambda-h", type=float, default=5e-3, help="weight decay on the features H")
    p.add_argument("--dim", type=int, default=None,
                   help="feature dimension d (default: K for the learned head, the polytope's natural d otherwise)")
    p.add_argument("--scale", type=float, default=1.0, help="fixed heads: logit scale s")
    p.add_argument("--normalize", default="none", choices=NORMALIZATIONS, help="fixed heads: feature normalisation")
    p.add_argument("--bias", action="store_true", help="learned head: a free (unregularised) bias")
    p.add_argument("--optimizer", default="lbfgs", choices=OPTIMIZERS)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--every", type=int, default=None, help="measure collapse every this many steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/ufm", help="folder for the collapse plots and summary.json")
    p.add_argument("--figure", default=None, help="path of the comparison figure (default: OUT/ufm_heads.png)")
    p.add_argument("--no-run-plots", action="store_true",
                   help="skip the per-run collapse plots (most of the run time); the comparison figure is still written")
    return p


def _minority_note(counts: tuple[int, ...], args, W) -> str | None:
    """The learned head's minority-collapse prediction beside the simulation, for two-group counts."""
    sizes = sorted(set(counts))
    if len(sizes) != 2 or counts.count(sizes[0]) < 2:
        return None
    n_minor, n_major = sizes
    ratio = minority_collapse_threshold(counts.count(n_major), counts.count(n_minor), n_minor,
                                        args.lambda_w, args.lambda_h)
    predicted = n_major / n_minor >= ratio
    return (f"minority collapse: ratio {n_major / n_minor:g}, threshold {ratio:.4g} -> "
            f"{'collapsed' if predicted else 'not collapsed'} in theory; simulated minority row spread "
            f"{minority_spread(W, counts):.2e}")


def _fmt(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


def run(args: argparse.Namespace) -> list[dict]:
    settings = [(spec, parse_counts(spec)) for spec in args.counts]
    runs, rows, notes = [], [], []
    for spec, counts in settings:
        for head in args.heads:
            dim = args.dim if args.dim is not None else (len(counts) if head == "learned" else None)
            dim = dim if dim is not None else polytopes.natural_dim(head, len(counts))
            started = time.perf_counter()
            sim = simulate(counts, dim, args.lambda_w, args.lambda_h, head=head, loss=args.loss, steps=args.steps,
                           lr=args.lr, optimizer=args.optimizer, seed=args.seed, every=args.every, scale=args.scale,
                           normalize=args.normalize, bias=args.bias)
            seconds = time.perf_counter() - started
            try:
                optimum = global_optimum(counts, args.lambda_w, args.lambda_h, head=head, loss=args.loss, dim=dim,
                                         scale=args.scale, normalize=args.normalize, bias=args.bias)
            except FixedclsError as exc:
                optimum, theory, reason = None, {}, str(exc)
            else:
                theory, reason = optimum.metrics(), None
            logit_error = None
            if optimum is not None:
                logits = args.scale * sim.class_means @ sim.W.T + (0 if sim.bias is None else sim.bias)
                logit_error = float((logits - optimum.logits).abs().max())
            row = {
                "counts": spec, "head": head, "dim": dim, "steps": sim.steps, "converged": sim.converged,
                "seconds": seconds, "objective": sim.objective,
                "objective_theory": None if optimum is None else optimum.objective,
                "logit_error": logit_error, "theory_solver": None if optimum is None else optimum.solver,
                "no_theory": reason,
                **{k: sim.metrics[k] for k in _SHOWN}, **{f"{k}_theory": theory.get(k) for k in _SHOWN},
            }
            rows.append(row)
            runs.append((spec, head, sim, optimum))
            if not args.no_run_plots:
                plot_collapse(sim.collapse_history(), os.path.join(args.out, f"{spec.replace(',', '+')}-{head}.png"),
                              title=f"UFM {spec}, {head} head, {args.loss} (x axis: optimizer step)",
                              splits=(("collapse/", "simulation"),))
            if head == "learned" and not args.bias:  # the threshold is derived without a bias
                note = _minority_note(counts, args, sim.W)
                if note:
                    notes.append(f"{spec}, learned: {note}")

    print("| counts | head | d | steps | objective (sim / theory) | max logit error | "
          + " | ".join(f"{k} (sim / theory)" for k in _SHOWN) + " |")
    print("|---" * (5 + len(_SHOWN)) + "|")
    for r in rows:
        cells = [r["counts"], r["head"], str(r["dim"]), f"{r['steps']}{'' if r['converged'] else ' (not converged)'}",
                 f"{_fmt(r['objective'])} / {_fmt(r['objective_theory'])}", _fmt(r["logit_error"])]
        cells += [f"{_fmt(r[k])} / {_fmt(r[k + '_theory'])}" for k in _SHOWN]
        print("| " + " | ".join(cells) + " |")
    for r in rows:
        if r["no_theory"]:
            print(f"no theory for {r['counts']}, {r['head']}: {r['no_theory']}")
    for note in notes:
        print(note)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(rows, f, indent=1)
    if len(runs) > 1:
        figure = plot_heads(runs, args.figure or os.path.join(args.out, "ufm_heads.png"))
        print(f"wrote {figure}")
    plots = "" if args.no_run_plots else f"{len(runs)} collapse plot(s) and "
    print(f"wrote {plots}summary.json to {args.out}")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command(lambda: run(args) and 0, prog="python -m fixedcls.ufm")


if __name__ == "__main__":
    sys.exit(main())
