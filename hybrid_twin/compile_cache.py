"""JAX's persistent compilation cache for the `hybrid-twin` command, and a count of the
XLA compilations a process runs.

A CLI run compiles dozens of programs (simulate, calibration steps, population rounds,
prediction); on a GPU one fused kernel with sensitivities can take tens of seconds. With
the persistent cache on, a second run of the same config loads those executables from disk
instead of compiling them again. The cache key is the compiled program (StableHLO), the
compile options, the device kind and the jaxlib version, so a changed model, shape, dtype or
JAX version compiles anew; entries are never wrong, only unused.

    enable_compilation_cache()              # $HYBRID_TWIN_COMPILE_CACHE or the user cache dir
    with CompileCounter() as counter:
        ...
    print(counter.summary())                # "compilations: 2 (persistent cache hits: 35)"

The directory is trusted: anyone who can write to it can make this process run code
(JAX's own warning for `set_cache_dir`). Keep it private to the user.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import jax
import jax.monitoring
from jax.experimental.compilation_cache import compilation_cache as jax_cache

logger = logging.getLogger("hybrid_twin")

ENV_DIR = "HYBRID_TWIN_COMPILE_CACHE"
"""Environment variable: the cache directory, or `off` / `0` / `false` / `no` for none."""
ENV_LOG = "HYBRID_TWIN_LOG_COMPILES"
"""Environment variable: `1` makes the CLI print its compilation count at exit."""
OFF_VALUES = frozenset({"off", "0", "false", "no"})

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
"""Duration event around every request for an XLA executable that JAX's in-memory caches
could not serve: recorded once per request, whether XLA then compiled it or the
persistent cache supplied it (jax/_src/interpreters/pxla.py, `_cached_compilation`)."""
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
"""Event: an executable was loaded from the persistent cache instead of compiled
(jax/_src/compiler.py, `compile_or_get_cached`)."""
CACHE_WRITE_EVENT = "/jax/compilation_cache/cache_misses"
"""Event: a freshly compiled executable was written to the persistent cache (JAX calls it
a miss; jax/_src/compilation_cache.py, `put_executable_and_time`)."""

_CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_enable_compilation_cache",
                  "jax_persistent_cache_min_compile_time_secs",
                  "jax_persistent_cache_min_entry_size_bytes")
_SUMMARY = re.compile(r"^compilations: (\d+) \(persistent cache hits: (\d+)\)\s*$", re.M)


def user_cache_dir() -> Path:
    """The per-user cache root: `$XDG_CACHE_HOME` or `~/.cache` on Linux,
    `~/Library/Caches` on macOS, `%LOCALAPPDATA%` on Windows."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches"
    if os.name == "nt":
        local = os.environ.get("LOCALAPPDATA")
        return Path(local) if local else Path.home() / "AppData" / "Local"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"


def default_cache_dir() -> Path | None:
    """The directory `enable_compilation_cache()` uses when given none, or None when the
    cache is switched off.

    In order: `$HYBRID_TWIN_COMPILE_CACHE` (`off`, `0`, `false` or `no`: switched off),
    `$JAX_COMPILATION_CACHE_DIR` (JAX's own setting), `<user cache dir>/hybrid_twin/jax`.
    """
    value = os.environ.get(ENV_DIR, "").strip()
    if value.lower() in OFF_VALUES:
        return None
    if value:
        return Path(value).expanduser()
    jax_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR", "").strip()
    if jax_dir:
        return Path(jax_dir).expanduser()
    return user_cache_dir() / "hybrid_twin" / "jax"


def _usable(directory: Path) -> str | None:
    """None when `directory` exists (or was created) and takes a file, else the reason."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache for this process.

    Every compiled program is cached, however short its compile time (JAX's default
    threshold of 1 s would skip almost all CPU compiles) and however small its executable.
    Takes effect for the compilations that follow, also when JAX has already compiled
    something.

    Args:
        directory: where to keep the cache; None for `default_cache_dir()` (which honours
            `$HYBRID_TWIN_COMPILE_CACHE`, including its `off`).

    Returns:
        The cache directory, or None when the cache is off: switched off by the
        environment, or the directory cannot be created or written (then a warning on the
        `hybrid_twin` logger says why and the run goes on without the cache).
    """
    path = Path(directory).expanduser() if directory is not None else default_cache_dir()
    if path is None:
        disable_compilation_cache()
        return None
    problem = _usable(path)
    if problem is not None:
        logger.warning("compilation cache: cannot use directory %s (%s); running without "
                       "the persistent cache (set %s to a writable directory, or to 'off')",
                       path, problem, ENV_DIR)
        disable_compilation_cache()
        return None
    path = path.resolve()
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax_cache.reset_cache()
    return path


def disable_compilation_cache() -> None:
    """Turn JAX's persistent compilation cache off for the compilations that follow
    (whatever `$JAX_COMPILATION_CACHE_DIR` says)."""
    jax.config.update("jax_enable_compilation_cache", False)
    jax_cache.reset_cache()


@contextlib.contextmanager
def scoped_compilation_cache(directory: str | os.PathLike | None = None,
                             enabled: bool = True) -> Iterator[Path | None]:
    """`enable_compilation_cache(directory)` (or, with `enabled=False`, the cache off) for
    the duration of a `with` block; JAX's previous cache settings are restored after it.

    Yields the cache directory, or None when the cache is off.
    """
    before = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
    try:
        if enabled:
            yield enable_compilation_cache(directory)
        else:
            disable_compilation_cache()
            yield None
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        jax_cache.reset_cache()


class CompileCounter:
    """Counts the XLA compilations of this process while active, from JAX's monitoring
    events (all threads).

    Use as a context manager, or `start()` / `stop()`. Counts stay readable after stop.

    Attributes:
        requests: executables JAX needed that its in-memory caches did not hold
            (`BACKEND_COMPILE_EVENT`).
        cache_hits: of those, loaded from the persistent cache (`CACHE_HIT_EVENT`).
        cache_writes: compiled executables written to the persistent cache
            (`CACHE_WRITE_EVENT`).
    """

    def __init__(self) -> None:
        self.requests = 0
        self.cache_hits = 0
        self.cache_writes = 0
        self._active = False

    @property
    def compiles(self) -> int:
        """XLA compilations that actually ran: requests not served by the persistent cache."""
        return self.requests - self.cache_hits

    def _on_duration(self, event: str, duration_secs: float, **kwargs: Any) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.requests += 1

    def _on_event(self, event: str, **kwargs: Any) -> None:
        if event == CACHE_HIT_EVENT:
            self.cache_hits += 1
        elif event == CACHE_WRITE_EVENT:
            self.cache_writes += 1

    def start(self) -> CompileCounter:
        """Start counting (idempotent)."""
        if not self._active:
            jax.monitoring.register_event_duration_secs_listener(self._on_duration)
            jax.monitoring.register_event_listener(self._on_event)
            self._active = True
        return self

    def stop(self) -> None:
        """Stop counting (idempotent); the counts are kept."""
        if self._active:
            jax.monitoring.unregister_event_duration_listener(self._on_duration)
            jax.monitoring.unregister_event_listener(self._on_event)
            self._active = False

    def __enter__(self) -> CompileCounter:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def summary(self) -> str:
        """One line, `compilations: C (persistent cache hits: H)`: C XLA compilations ran,
        H executables came from the persistent cache instead (`parse_summary` reads it)."""
        return f"compilations: {self.compiles} (persistent cache hits: {self.cache_hits})"


def parse_summary(text: str) -> tuple[int, int]:
    """(compilations, persistent cache hits) from the last `CompileCounter.summary()` line
    in `text` (e.g. a CLI run's stderr).

    Raises:
        ValueError: no such line in `text`.
    """
    found = _SUMMARY.findall(text)
    if not found:
        raise ValueError("expected a line 'compilations: N (persistent cache hits: M)' "
                         f"(printed with {ENV_LOG}=1 or --log-compiles); got "
                         f"{text[-300:]!r}")
    compiles, hits = found[-1]
    return int(compiles), int(hits)


def log_compiles_requested() -> bool:
    """True when `$HYBRID_TWIN_LOG_COMPILES` asks for the compilation count (`1`, `true`,
    `yes`, `on`)."""
    return os.environ.get(ENV_LOG, "").strip().lower() in {"1", "true", "yes", "on"}
