"""The persistent compilation cache: a second CLI run of a config compiles almost nothing
and gives the same results; the cache can be switched off, and a directory that cannot be
used only costs a warning."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from hybrid_twin.cli import build_parser
from hybrid_twin.compile_cache import (
    CompileCounter,
    default_cache_dir,
    enable_compilation_cache,
    parse_summary,
    scoped_compilation_cache,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.virtual.n=16", "data.virtual.horizon=720", "data.virtual.obs_every=20",
        "evaluation.condition_until=400", "evaluation.splits=[test]",
        "population.max_rounds=1", "calibration.max_iter=5", "output.plots=false"]


def cli_run(out: Path, *cache_args: str) -> tuple[int, int]:
    """`hybrid-twin [cache_args] run configs/quickstart.yaml` (tiny) in a fresh process;
    returns (XLA compilations, persistent cache hits) from its stderr."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HYBRID_TWIN_LOG_COMPILES": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("HYBRID_TWIN_COMPILE_CACHE", None)
    cmd = [sys.executable, "-m", "hybrid_twin.cli", *cache_args, "run", "configs/quickstart.yaml",
           *sum((["--set", s] for s in TINY), []), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return parse_summary(proc.stderr)


def results(run_dir: Path) -> tuple[str, str, dict]:
    """What a run computed: params.csv, predictions.csv and metrics.json without run metadata."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("run")
    return ((run_dir / "params.csv").read_text(), (run_dir / "predictions.csv").read_text(),
            metrics)


@pytest.mark.slow
def test_second_cli_run_loads_its_programs_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    cold, cold_hits = cli_run(tmp_path / "cold", "--compile-cache", str(cache))
    warm, warm_hits = cli_run(tmp_path / "warm", "--compile-cache", str(cache))
    assert cold >= 20 and warm * 5 <= cold, (cold, warm)
    assert warm_hits >= cold - warm
    assert results(tmp_path / "warm") == results(tmp_path / "cold")


def test_counter_sees_compiles_and_cache_hits_in_process(tmp_path):
    def f(x):
        return jnp.sin(x) * 3.0 + jnp.cos(x)

    x = jnp.arange(7.0)
    with scoped_compilation_cache(tmp_path / "cache") as path:
        assert path == (tmp_path / "cache").resolve()
        with CompileCounter() as first:
            jax.jit(f)(x).block_until_ready()
        jax.clear_caches()
        with CompileCounter() as second:
            jax.jit(f)(x).block_until_ready()
    assert (first.compiles, first.cache_hits, first.cache_writes) == (1, 0, 1)
    assert (second.compiles, second.cache_hits) == (0, 1)
    assert parse_summary("log\n" + second.summary() + "\n") == (0, 1)
    assert jax.config.jax_compilation_cache_dir != str(path)  # settings restored


@pytest.mark.parametrize("value", ["off", "0", "false", "OFF"])
def test_environment_switches_the_cache_off(monkeypatch, tmp_path, value):
    monkeypatch.setenv("HYBRID_TWIN_COMPILE_CACHE", value)
    assert default_cache_dir() is None
    x = jnp.arange(3.0)
    with scoped_compilation_cache():
        assert enable_compilation_cache() is None
        assert not jax.config.jax_enable_compilation_cache
        with CompileCounter() as counter:
            jax.jit(lambda x: x * 2.5 - 1.0)(x).block_until_ready()
        assert (counter.compiles, counter.cache_hits, counter.cache_writes) == (1, 0, 0)


def test_default_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("HYBRID_TWIN_COMPILE_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("HYBRID_TWIN_COMPILE_CACHE")
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert default_cache_dir() == tmp_path / "xdg" / "hybrid_twin" / "jax"


def test_unusable_directory_warns_and_runs_without_cache(tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    x = jnp.arange(3.0)
    with caplog.at_level(logging.WARNING, logger="hybrid_twin"):
        with scoped_compilation_cache(blocker / "cache") as path:
            assert path is None
            with CompileCounter() as counter:
                y = jax.jit(lambda x: x + 4.0)(x)
    assert float(y[2]) == 6.0 and counter.compiles == 1 and counter.cache_writes == 0
    assert "cannot use directory" in caplog.text and str(blocker) in caplog.text


@pytest.mark.parametrize("argv", [
    ["--no-compile-cache", "--compile-cache", "D", "run", "c.yaml"],
    ["run", "c.yaml", "--no-compile-cache", "--compile-cache", "D"],
    ["--compile-cache", "D", "run", "--no-compile-cache", "c.yaml"],
])
def test_cache_flags_are_accepted_before_and_after_the_subcommand(argv):
    args = build_parser().parse_args(argv)
    assert (args.use_compile_cache, args.compile_cache, args.log_compiles) == (False, "D", False)
    assert build_parser().parse_args(["--log-compiles", "evaluate", "r"]).log_compiles
    assert build_parser().parse_args(["run", "c.yaml"]).use_compile_cache
