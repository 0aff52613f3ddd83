"""The `hybrid-twin` command.

    hybrid-twin models                      list the model library (states, parameters, sources)
    hybrid-twin simulate [options]          simulate a virtual cohort and write its run directory
"""

from __future__ import annotations

import argparse
import sys

from .models import REGISTRY, get_model


def _cmd_models(args: argparse.Namespace) -> int:
    names = [args.name] if args.name else list(REGISTRY)
    for name in names:
        print(f"{name}: " + get_model(name).describe())
        print()
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .quickstart import run_virtual_cohort

    out = run_virtual_cohort(n=args.n, seed=args.seed, out=args.out, dtype=args.dtype)
    print(f"output written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="hybrid-twin",
        description="Hybrid mechanistic-ML digital twins of patients.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="list the model library",
                       description="Print each model's states, parameters (units, typical "
                                   "values, bounds, spreads, sources), observables and "
                                   "dose targets.")
    p.add_argument("name", nargs="?", choices=list(REGISTRY), help="one model only")
    p.set_defaults(fn=_cmd_models)
    p = sub.add_parser("simulate", help="simulate a virtual glucose cohort",
                       description="Sample N virtual patients of glucose.BergmanMinimal, "
                                   "give each three meals with insulin, simulate 24 h and "
                                   "write glucose every 5 min to OUT/predictions.csv.")
    p.add_argument("--n", type=int, default=1000, help="number of virtual patients")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--out", default="runs/simulate", help="output directory")
    p.set_defaults(fn=_cmd_simulate)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
