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

Errors (`hybrid_twin.errors`): bad input (config, data, run directory, arguments, a
`device: gpu` that JAX cannot see) prints `hybrid-twin: error: <what and where>` and exits
2; a failing environment (read-only or full disk, missing file permissions) or a run in
which every patient failed exits 1;
Ctrl-C exits 130; anything else is reported as an internal error (exit 1). `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from .compile_cache import CompileCounter, log_compiles_requested, scoped_compilation_cache
from .errors import EXIT_ENVIRONMENT, EXIT_INPUT, InputError, RunDirectoryError, RunFailed
from .models import REGISTRY, get_model

EXIT_INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT), as shells report it."""


class _WriteFailed(OSError):
    """An OSError that named no file, re-raised naming the directory being written."""


@contextlib.contextmanager
def _writing_in(directory: str | os.PathLike) -> Iterator[None]:
    """Name `directory` in an operating-system error that names no file (a write to an
    open file on a full disk names none)."""
    try:
        yield
    except OSError as e:
        if e.errno is None or e.filename is not None or isinstance(e, _WriteFailed):
            raise
        raise _WriteFailed(e.errno, e.strerror or str(e), str(directory)) from e


def _check_out(out: str | os.PathLike, what: str) -> Path:
    """An output directory must be a directory or creatable as one: an existing regular
    file at it (or at one of its parents) is an input error."""
    out = Path(out)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise InputError(f"{what} {out}: {p} exists and is not a directory; give a "
                                 "directory for the outputs")
            break
    return out


def _overrides(args: argparse.Namespace) -> list[str]:
    return [*args.set, *(["data.pseudonymise=true"] if args.pseudonymise else [])]


def _cmd_models(args: argparse.Namespace) -> int:
    names = [args.name] if args.name else list(REGISTRY)
    for name in names:
        print(f"{name}: " + get_model(name).describe())
        print()
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    out = _check_out(args.out, "--out")
    if args.config is None:
        if args.set or args.model_from or args.pseudonymise:
            raise InputError("simulate: --set, --model-from and --pseudonymise need a CONFIG")
        from .quickstart import run_virtual_cohort

        with _writing_in(out):
            out = run_virtual_cohort(n=args.n, seed=args.seed or 0, out=str(out),
                                     dtype=args.dtype)
        print(f"output written to {out}")
        return 0
    from .config import check_private_paths, load_config

    cfg = load_config(args.config, overrides=_overrides(args))
    check_private_paths(cfg, out)
    if args.model_from is not None and not Path(args.model_from, "config.yaml").is_file():
        raise RunDirectoryError(f"--model-from {args.model_from}: not a run directory (no "
                                "config.yaml)")
    from training.simulate import simulate_experiment

    with _writing_in(out):
        out = simulate_experiment(cfg, out, chunk=args.chunk, model_from=args.model_from,
                                  seed=args.seed)
    print(f"output written to {out}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import check_private_paths, load_config

    cfg = load_config(args.config, overrides=_overrides(args))
    out = _check_out(args.out or cfg.output.dir, "--out" if args.out else "output.dir")
    check_private_paths(cfg, out)
    from training.run import run_experiment

    with _writing_in(out):
        out = run_experiment(cfg, out, stop_after=args.stage,
                             force_restart=args.force_restart)
    print(f"run directory: {out.resolve()}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        what = "not a directory" if run_dir.exists() else "not found"
        raise RunDirectoryError(f"{run_dir}: {what}; expected a run directory (the --out of "
                                "hybrid-twin run)")
    from training.evaluate import evaluate_run

    with _writing_in(run_dir):
        evaluate_run(run_dir)
    return 0


BENCHMARKS = ("simulate", "calibrate", "hdf5_memory", "hybrid_value", "gpu_ensemble",
              "gpu_workflow")


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(f"benchmarks.{args.name}")
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("benchmarks"):
            raise
        raise InputError("bench: the benchmarks/ folder is not importable; run from the "
                         "repository root") from None
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


def _debug_option(top_level: bool) -> argparse.ArgumentParser:
    """`--debug`, accepted before and after the subcommand."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true",
                   default=False if top_level else argparse.SUPPRESS,
                   help="on an error, show the Python traceback instead of a one-line message")
    return p


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="hybrid-twin",
        parents=[_cache_options(top_level=True), _debug_option(top_level=True)],
        description="Hybrid mechanistic-ML digital twins of patients.",
        epilog="Exit codes: 0 success, 2 bad input (config, data, arguments, run "
               "directory, a requested device that is missing), 1 environment failure "
               "(disk, permissions) or a run in which every patient failed, 130 "
               "interrupted.")
    sub = ap.add_subparsers(dest="command", required=True)

    def add(name: str, **kwargs) -> argparse.ArgumentParser:
        parents = [_cache_options(top_level=False)] if name in COMPUTING else []
        return sub.add_parser(name, parents=[*parents, _debug_option(top_level=False)],
                              **kwargs)

    def pseudonymise(p: argparse.ArgumentParser) -> None:
        p.add_argument("--pseudonymise", action="store_true",
                       help="replace patient IDs by keyed hashes on import (= --set "
                            "data.pseudonymise=true; key from data.pseudonym_key_file or "
                            "$HYBRID_TWIN_PSEUDONYM_KEY)")

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
        p.add_argument("--force-restart", action="store_true",
                       help="start the run over in --out instead of resuming its checkpoints")
        pseudonymise(p)
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
    p.add_argument("--chunk", type=_positive_int, default=10_000,
                   help="patients per simulate call")
    p.add_argument("--n", type=_positive_int, default=1000,
                   help="number of virtual patients (without CONFIG; else data.virtual.n)")
    p.add_argument("--seed", type=_nonnegative_int, default=None,
                   help="parameter draws (default: the config's seed, or 0)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64",
                   help="without CONFIG only")
    p.add_argument("--out", default="runs/simulate", help="output directory")
    pseudonymise(p)
    p.set_defaults(fn=_cmd_simulate)
    return ap


def _os_error_message(e: OSError) -> str:
    """`file: reason (ERRNO)` for an OSError; the directory being written when no file is
    known."""
    reason = e.strerror or str(e)
    if e.errno in errno.errorcode:
        reason += f" ({errno.errorcode[e.errno]})"
    if isinstance(e, _WriteFailed):
        return f"writing in {e.filename}: {reason}"
    if e.filename is None:
        return reason
    files = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
    return f"{files}: {reason}"


def report_error(e: BaseException) -> int:
    """Print `e` for a command-line user (no traceback) and return the exit code: 2 for
    bad input, 1 for a failing environment or run, 130 for an interrupt, 1 for anything
    else (an internal error)."""
    if isinstance(e, InputError):
        print(f"hybrid-twin: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    if isinstance(e, KeyboardInterrupt):
        print("hybrid-twin: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(e, RunFailed):
        print(f"hybrid-twin: run failed: {e}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    if isinstance(e, OSError):
        print(f"hybrid-twin: error: {_os_error_message(e)}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    print(f"hybrid-twin: internal error: {type(e).__name__}: {e} (rerun with --debug for "
          "the traceback)", file=sys.stderr)
    return EXIT_ENVIRONMENT


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); returns the exit code. Errors
    are reported by `report_error` unless `--debug` is given, which re-raises them."""
    args = build_parser().parse_args(argv)
    try:
        if args.command not in COMPUTING:
            return args.fn(args)
        counter = CompileCounter()
        with scoped_compilation_cache(args.compile_cache, enabled=args.use_compile_cache), \
                counter:
            try:
                return args.fn(args)
            finally:
                if args.log_compiles or log_compiles_requested():
                    print(counter.summary(), file=sys.stderr, flush=True)
    except (Exception, KeyboardInterrupt) as e:
        if args.debug:
            raise
        return report_error(e)


if __name__ == "__main__":
    sys.exit(main())
