"""The `hybrid-twin` command.

    hybrid-twin run CONFIG [--set k=v] [--out DIR]   run a whole experiment from a YAML config
    hybrid-twin train|calibrate|predict CONFIG ...   run it stage by stage (same run directory)
    hybrid-twin evaluate RUN_DIR            recompute a run's metrics from its predictions.csv
    hybrid-twin bench NAME [ARGS]           run a benchmark (simulate, calibrate, hdf5_memory,
                                            hybrid_value, gpu_ensemble, gpu_workflow)
    hybrid-twin models                      list the model library (states, parameters, sources)
    hybrid-twin simulate [CONFIG] [options] simulate a config's cohort (or a virtual one)

Every command that computes turns on JAX's persistent compilation cache first (see
`hybrid_twin.compile_cache`): `--compile-cache DIR` chooses its directory,
`--no-compile-cache` switches it off, and `--log-compiles` (or HYBRID_TWIN_LOG_COMPILES=1)
prints `compilations: C (persistent cache hits: H)` to stderr at exit.
"""

from __future__ import annotations

import argparse
import sys

from . import xla_flags
from .compile_cache import CompileCounter, log_compiles_requested, scoped_compilation_cache
from .models import REGISTRY, get_model


def _cmd_models(args: argparse.Namespace) -> int:
    names = [args.name] if args.name else list(REGISTRY)
    for name in names:
        print(f"{name}: " + get_model(name).describe())
        print()
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    if args.config is None:
        from .quickstart import run_virtual_cohort

        out = run_virtual_cohort(n=args.n, seed=args.seed or 0, out=args.out, dtype=args.dtype)
        print(f"output written to {out}")
        return 0
    from .config import ConfigError, load_config

    try:
        cfg = load_config(args.config, overrides=args.set)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from training.simulate import simulate_experiment

    out = simulate_experiment(cfg, args.out, chunk=args.chunk, model_from=args.model_from,
                              seed=args.seed)
    print(f"output written to {out}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config

    try:
        cfg = load_config(args.config, overrides=args.set)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from training.run import run_experiment

    out = run_experiment(cfg, args.out, stop_after=args.stage)
    print(f"run directory: {out.resolve()}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_run

    evaluate_run(args.run_dir)
    return 0


BENCHMARKS = ("simulate", "calibrate", "hdf5_memory", "hybrid_value", "gpu_ensemble",
              "gpu_workflow")


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib
    import os

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(f"benchmarks.{args.name}")
    except ModuleNotFoundError:
        print("bench: the benchmarks/ folder is not importable; run from the repository root",
              file=sys.stderr)
        return 2
    module.main(args.args)
    return 0


COMPUTING = frozenset({"run", "train", "calibrate", "predict", "simulate", "evaluate", "bench"})
"""Subcommands that run JAX computations, and so use the persistent compilation cache."""


def _cache_options(top_level: bool) -> argparse.ArgumentParser:
    """The compilation-cache options, accepted before and after the subcommand; only the
    top-level parser sets defaults, so a subcommand's copy does not undo an earlier one."""

    def default(value: object) -> object:
        return value if top_level else argparse.SUPPRESS

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("compilation cache")
    g.add_argument("--compile-cache", metavar="DIR", dest="compile_cache", default=default(None),
                   help="directory of JAX's persistent compilation cache (default: "
                        "$HYBRID_TWIN_COMPILE_CACHE, else ~/.cache/hybrid_twin/jax)")
    g.add_argument("--no-compile-cache", action="store_false", dest="use_compile_cache",
                   default=default(True),
                   help="compile everything afresh; neither read nor write the cache")
    g.add_argument("--log-compiles", action="store_true", dest="log_compiles",
                   default=default(False),
                   help="print 'compilations: C (persistent cache hits: H)' to stderr at "
                        "exit (also HYBRID_TWIN_LOG_COMPILES=1)")
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="hybrid-twin", parents=[_cache_options(top_level=True)],
        description="Hybrid mechanistic-ML digital twins of patients.")
    sub = ap.add_subparsers(dest="command", required=True)

    def add(name: str, **kwargs) -> argparse.ArgumentParser:
        parents = [_cache_options(top_level=False)] if name in COMPUTING else []
        return sub.add_parser(name, parents=parents, **kwargs)

    stages = {
        "run": ("predict", "run a whole experiment from a YAML config",
                "data -> split -> population fit -> (hybrid training) -> per-patient "
                "calibration up to evaluation.condition_until -> forecast -> metrics.json, "
                "predictions.csv, params.csv, plots."),
        "train": ("train", "population fit and hybrid training only",
                  "data -> split -> population fit -> training of the learned terms "
                  "(model.learned); checkpoints and training.png in the run directory."),
        "calibrate": ("calibrate", "up to per-patient calibration (params.csv)",
                      "as `run`, stopping after the per-patient calibrations: params.csv "
                      "with estimates and standard errors; reuses earlier stages' checkpoints."),
        "predict": ("predict", "forecasts and metrics (reusing earlier stages)",
                    "as `run`: stages already checkpointed in --out (train, calibrate) are "
                    "reloaded, then predictions.csv, metrics.json and plots are written."),
    }
    for name, (stage, short, long) in stages.items():
        p = add(name, help=short,
                description=long + " The config is validated before any compute.")
        p.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
        p.add_argument("--set", action="append", default=[], metavar="KEY.SUB=VALUE",
                       help="override a config key (repeatable), e.g. --set data.virtual.n=50")
        p.add_argument("--out", default=None, help="run directory (default: output.dir)")
        p.set_defaults(fn=_cmd_run, stage=stage)
    p = add("evaluate", help="recompute a run's metrics from its predictions",
            description="Read RUN_DIR/predictions.csv and config.yaml, compute RMSE "
                        "and MAE per split and observable on the observations after "
                        "evaluation.condition_until, rewrite metrics.json (keeping "
                        "its run metadata) and print the summary table.")
    p.add_argument("run_dir")
    p.set_defaults(fn=_cmd_evaluate)
    p = add("bench", help="run a benchmark from benchmarks/",
            description="Run benchmarks/NAME.py with ARGS (see each one's --help); "
                        "from the repository root.")
    p.add_argument("name", choices=BENCHMARKS)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=_cmd_bench)
    p = add("models", help="list the model library",
            description="Print each model's states, parameters (units, typical "
                        "values, bounds, spreads, sources), observables and "
                        "dose targets.")
    p.add_argument("name", nargs="?", choices=list(REGISTRY), help="one model only")
    p.set_defaults(fn=_cmd_models)
    p = add("simulate", help="simulate a config's cohort (or a virtual glucose one)",
            description="With CONFIG: simulate the config's model (or the trained "
                        "model of --model-from RUN_DIR) over its cohort's doses, "
                        "inputs and observation times, parameters drawn from the "
                        "population, in chunks with progress lines; write "
                        "OUT/predictions.csv (ID, TIME, OBS, PRED, STATUS), "
                        "params.csv and summary.json. Without CONFIG: sample N "
                        "virtual patients of glucose.BergmanMinimal with three "
                        "meals and insulin and simulate 24 h.")
    p.add_argument("config", nargs="?", default=None, help="YAML experiment config")
    p.add_argument("--set", action="append", default=[], metavar="KEY.SUB=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--model-from", default=None, metavar="RUN_DIR",
                   help="use the trained model and estimated population of a run")
    p.add_argument("--chunk", type=int, default=10_000, help="patients per simulate call")
    p.add_argument("--n", type=int, default=1000,
                   help="number of virtual patients (without CONFIG; else data.virtual.n)")
    p.add_argument("--seed", type=int, default=None,
                   help="parameter draws (default: the config's seed, or 0)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64",
                   help="without CONFIG only")
    p.add_argument("--out", default="runs/simulate", help="output directory")
    p.set_defaults(fn=_cmd_simulate)
    return ap


def main(argv: list[str] | None = None) -> int:
    xla_flags.apply()  # before JAX creates its backends
    args = build_parser().parse_args(argv)
    if args.command not in COMPUTING:
        return args.fn(args)
    counter = CompileCounter()
    with scoped_compilation_cache(args.compile_cache, enabled=args.use_compile_cache), counter:
        try:
            return args.fn(args)
        finally:
            if args.log_compiles or log_compiles_requested():
                print(counter.summary(), file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
