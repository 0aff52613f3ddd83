"""GPU workflow benchmark: what a user waits for, end to end, from the command line.

`cli_run`: `hybrid-twin run CONFIG` in a fresh process, twice with the same persistent
compilation-cache directory: cold (the directory empty) and warm (filled by the cold run).
Each line reports the wall time (s, process start to exit, imports included), the XLA
compilations the process ran and the executables it loaded from the cache instead (from the
`compilations: C (persistent cache hits: H)` line of `--log-compiles`), and the run's own
stage times (metrics.json `run.wall_s`). Configs: configs/quickstart.yaml and
configs/glucose_hybrid.yaml as shipped; `--quick` shrinks them (16 patients, 12 h, one
population round) to check the script on a CPU.

    python -m benchmarks.gpu_workflow --out benchmarks/results/gpu_workflow-h100.jsonl
    python -m benchmarks.gpu_workflow --quick --out /tmp/gpu_workflow-cpu.jsonl

One JSON line per measurement: {"bench", "config", "phase", "wall_s", "compiles",
"cache_hits", ..., "device", "jax", "commit"}. A config that fails is recorded in its
line and the script goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import emit
from hybrid_twin.compile_cache import ENV_DIR, ENV_LOG, parse_summary

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("configs/quickstart.yaml", "configs/glucose_hybrid.yaml")
_TINY = ["data.virtual.n=16", "data.virtual.horizon=720", "data.virtual.obs_every=20",
         "evaluation.condition_until=400", "evaluation.splits=[test]",
         "population.max_rounds=1", "calibration.max_iter=5"]
QUICK_OVERRIDES: dict[str, list[str]] = {
    "configs/quickstart.yaml": _TINY,
    "configs/glucose_hybrid.yaml": _TINY + ["training.epochs=1", "training.batch_size=4"],
}
"""`--set` overrides of `--quick`: small enough for a CPU, every stage still runs."""


def _child_env() -> dict[str, str]:
    env = {**os.environ, ENV_LOG: "1"}
    env.pop(ENV_DIR, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


def run_cli(config: str, overrides: Iterable[str], run_dir: Path, cache_dir: Path,
            timeout_s: float = 1800.0) -> dict[str, Any]:
    """`hybrid-twin --compile-cache CACHE_DIR run CONFIG --set ... --out RUN_DIR` in a fresh
    Python process.

    Returns {"wall_s": process wall time (s), "compiles": XLA compilations,
    "cache_hits": executables loaded from the cache, "stages_s": the run's stage times (s)}.

    Raises:
        RuntimeError: the run exited with an error (its stderr's tail in the message).
    """
    cmd = [sys.executable, "-m", "hybrid_twin.cli", "--compile-cache", str(cache_dir),
           "run", config, *[a for o in overrides for a in ("--set", o)], "--out", str(run_dir)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(), capture_output=True, text=True,
                          timeout=timeout_s)
    wall_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited with {proc.returncode}, expected 0: "
                           f"{proc.stderr[-1500:]}")
    compiles, hits = parse_summary(proc.stderr)
    stages = json.loads((run_dir / "metrics.json").read_text()).get("run", {}).get("wall_s")
    return {"wall_s": round(wall_s, 3), "compiles": compiles, "cache_hits": hits,
            "stages_s": stages}


def time_cli_runs(config: str, overrides: Iterable[str], out_dir: str | os.PathLike,
                  timeout_s: float = 1800.0) -> dict[str, dict[str, Any]]:
    """Run CONFIG through the CLI cold (empty cache directory) and then warm (the same
    directory), each in a fresh process; run directories and cache under OUT_DIR.

    Returns {"cold": run_cli(...), "warm": run_cli(...)}.
    """
    out = Path(out_dir)
    cache = out / "compile_cache"
    shutil.rmtree(cache, ignore_errors=True)
    overrides = list(overrides)
    return {phase: run_cli(config, overrides, out / phase, cache, timeout_s)
            for phase in ("cold", "warm")}


def bench_cli_runs(args: argparse.Namespace, work: Path) -> Iterator[dict[str, Any]]:
    """`cli_run` lines: cold and warm for each of `args.configs`."""
    for config in args.configs:
        overrides = QUICK_OVERRIDES.get(config, []) if args.quick else []
        base = {"bench": "cli_run", "config": config, "overrides": overrides}
        try:
            timings = time_cli_runs(config, overrides, work / Path(config).stem,
                                    args.timeout)
        except Exception as e:  # noqa: BLE001 - recorded, the other configs still run
            yield {**base, "failed": f"{type(e).__name__}: {e}"[:1500],
                   "trace": traceback.format_exc()[-800:]}
            continue
        for phase, t in timings.items():
            yield {**base, "phase": phase, **t}


def bench_calibration(args: argparse.Namespace, work: Path) -> Iterator[dict[str, Any]]:
    """`calibrate` lines (in this process, after the CLI runs): glucose5 patients (the
    calibration benchmark's scenario), 30 LM iterations at most, backend auto in the
    device's precision policy: wall cold (with compilation) and warm, iterations, median
    relative error of each free parameter against the truth; then `precision` lines: the
    float32 fit against the float64 fit of the same patients (|dz| / SE)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    from benchmarks.calibrate import scenario
    from hybrid_twin import SolverOptions
    from hybrid_twin.calibrate import calibrate
    from hybrid_twin.solve import Auto

    n = 64 if args.quick else args.calibrate_n
    model, vc, free, em = scenario("glucose5", n, seed=0)
    opts = SolverOptions(backend=Auto(), controller=_controller(), precision="auto")
    idx = [model.index("param", f) for f in free]
    truth = np.asarray(vc.true_params)[:, idx]
    for phase in ("cold", "warm"):
        t0 = time.perf_counter()
        res = calibrate(model, vc.cohort, free=free, error_model=em, max_iter=30,
                        options=opts, error_rounds=1)
        jax.block_until_ready(res.params)
        wall = time.perf_counter() - t0
        est = np.asarray(res.params, np.float64)[:, idx]
        yield {"bench": "calibrate", "phase": phase, "n": n, "wall_s": wall,
               "iterations": res.n_iter, "dtype": str(res.params.dtype),
               "backend": opts.resolved(model).backend_name,
               "converged": float(np.mean(np.asarray(res.converged))),
               "median_rel_err": dict(zip(free, np.median(np.abs(est / truth - 1),
                                                          axis=0).tolist()))}
    m = min(n, 64 if args.quick else 2000)
    sub = jax.tree.map(lambda x: x[:m], vc.cohort)
    fits = {}
    for prec in ("float32", "float64"):
        fits[prec] = calibrate(model, sub, free=free, error_model=em, max_iter=30,
                               options=SolverOptions(backend=Auto(), controller=_controller(),
                                                     precision=prec), error_rounds=1)
    se = np.sqrt(np.diagonal(np.asarray(fits["float64"].cov_z), axis1=1, axis2=2))
    dz = np.abs(np.asarray(fits["float32"].z, np.float64) - np.asarray(fits["float64"].z)) / se
    yield {"bench": "precision", "n": m, "free": list(free),
           "median_dz_over_se": np.median(dz, axis=0).tolist(),
           "max_dz_over_se": np.max(dz, axis=0).tolist()}


def bench_kernel_compile(args: argparse.Namespace, work: Path) -> Iterator[dict[str, Any]]:
    """`kernel_compile` lines: seconds to lower and compile each kernel a calibration and a
    prediction use (Gauss–Newton with 5 free-parameter directions, and the forward solve;
    Tsit5 and RK4, stages unrolled and rolled: `Kernel(roll_stages=...)`), float32, N
    patients, and the first run's seconds (run directly, without the persistent cache)."""
    import jax

    from benchmarks.common import glucose_day_cohort
    from hybrid_twin.simulate import AxisDirections, FitData, normal_equations, simulate
    from hybrid_twin import RK4, SolverOptions

    n = 256 if args.quick else args.calibrate_n
    model, theta, sched, ts = glucose_day_cohort(n, dtype=np.float32)
    free = (0, 2, 4, 5, 6)
    dirs = AxisDirections(free, np.ones((len(free), n), np.float32))
    data = FitData(np.zeros((n, ts.shape[0]), np.float32), np.ones((n, ts.shape[0]),
                                                                    np.float32),
                   np.zeros((n, ts.shape[0]), np.int32))
    from hybrid_twin.solve import Kernel

    for method, roll in (("tsit5", False), ("tsit5", True), ("rk4", False), ("rk4", True)):
        opts = SolverOptions(method=RK4(1.0) if method == "rk4" else method,
                             backend=Kernel(roll_stages=roll), controller=_controller(),
                             max_steps=20_000)
        for what, fn in (
            ("gauss_newton", lambda th: normal_equations(model, th, dirs, sched, ts, None,
                                                         data, options=opts)),
            ("forward", lambda th: simulate(model, th, sched, ts, options=opts).ys),
        ):
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(theta).compile()
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(theta))
            yield {"bench": "kernel_compile", "kernel": what, "method": method,
                   "roll_stages": roll, "n": n,
                   "compile_s": compile_s, "first_run_s": time.perf_counter() - t0}


def _controller():
    from hybrid_twin import StepSizeController

    return StepSizeController(rtol=1e-6, atol=1e-6)


# The benches `main` runs, in order: each takes (parsed arguments, a scratch directory)
# and yields records; `main` adds device, JAX version and commit and writes them. The
# in-process ones come last (the CLI runs have the device to themselves).
BENCHES: list[Callable[[argparse.Namespace, Path], Iterable[dict[str, Any]]]] = [
    bench_cli_runs,
    bench_kernel_compile,
    bench_calibration,
]


def device_and_version() -> tuple[str, str]:
    """(device kind of `jax.devices()[0]`, JAX version), asked in a child process so that
    this one never holds the accelerator the runs need."""
    probe = "import jax; print(jax.devices()[0].device_kind); print(jax.__version__)"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=_child_env(),
                          capture_output=True, text=True, timeout=600, check=True)
    kind, version = proc.stdout.strip().splitlines()[-2:]
    return kind, version


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON-lines file to append to")
    ap.add_argument("--quick", action="store_true",
                    help="tiny configs (QUICK_OVERRIDES): checks the script on a CPU")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--work", default=None,
                    help="directory for run directories and caches (default: a temporary "
                         "one, removed at the end)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per CLI run, seconds")
    ap.add_argument("--only", nargs="+", default=None,
                    help="run only these benches (cli_runs, kernel_compile, calibration)")
    ap.add_argument("--calibrate-n", type=int, default=100_000,
                    help="patients of the calibration and kernel-compile benches")
    args = ap.parse_args(argv)
    device, jax_version = device_and_version()
    with tempfile.TemporaryDirectory(prefix="gpu_workflow-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        for bench in BENCHES:
            if args.only and bench.__name__.removeprefix("bench_") not in args.only:
                continue
            for record in bench(args, work):
                emit({**record, "device": device, "jax": jax_version}, args.out)


if __name__ == "__main__":
    main()
