"""Tests run in float64 on CPU (DESIGN.md: calibrate and test in float64)."""

import gc
import os
import shutil
import tempfile

import jax
import pytest

# One persistent compilation cache for the whole session, never the user's: created by the
# first process (the xdist controller, or pytest alone), inherited through the environment
# by the workers, the CLI's main() called in-process and the suite's subprocesses, and
# removed at the end. The suite's time is compile time, and its tests run the same
# programs again and again (a whole quick-start run in five tests of test_run.py alone)
# while JAX's in-memory caches are cleared between tests (see below): from the cache they
# load in a fraction of the compile time. Entries are keyed by the program, the compile
# options and the devices, so a hit is never a different program.
SESSION_CACHE_ENV = "HYBRID_TWIN_TEST_XLA_CACHE"
_OWN_CACHE = SESSION_CACHE_ENV not in os.environ
if _OWN_CACHE:
    os.environ[SESSION_CACHE_ENV] = tempfile.mkdtemp(prefix="hybrid_twin_test_xla_")
os.environ["HYBRID_TWIN_COMPILE_CACHE"] = os.environ[SESSION_CACHE_ENV]
# The suite's cohorts are tiny, so its time is XLA compile time: the CPU backend's LLVM
# optimisation passes are switched off (a third less compile time; IEEE semantics are
# kept, so results agree to rounding with optimised code). Set before JAX starts, and so
# inherited by the suite's subprocesses; HYBRID_TWIN_TEST_OPTIMISED_XLA=1 keeps them.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if os.environ.get("HYBRID_TWIN_TEST_OPTIMISED_XLA") != "1":
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_platforms", "cpu")

from hybrid_twin.compile_cache import enable_compilation_cache  # noqa: E402

enable_compilation_cache(os.environ[SESSION_CACHE_ENV])


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ[SESSION_CACHE_ENV], ignore_errors=True)

# `make test` hands out whole files (--dist loadfile) in collection order
# (--no-loadscope-reorder): the longest files go first, so that no worker is left alone
# with a long file at the end. Measured with `--durations` on the 2-core CI machine;
# other files follow in their usual order.
LONGEST_FIRST = ("test_hybrid_value.py", "test_kernel.py", "test_sharding.py", "test_run.py",
                 "test_population.py", "test_cli_errors.py", "test_kernel_policies.py",
                 "test_compile_cache.py", "test_training_gradients.py", "test_calibrate.py",
                 "test_benchmarks.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


RELEASE_AFTER_EACH_TEST = ("test_run.py",)
"""Files whose tests each compile a whole run's programs (little shared between tests):
their programs are dropped after every test, not only after the file (one worker died at
the mapping limit inside tests/test_run.py, after seven end-to-end runs)."""


@pytest.fixture(autouse=True)
def _release_after_heavy_tests(request):
    """`_release_compiled_programs` after each test of `RELEASE_AFTER_EACH_TEST`."""
    yield
    if request.node.path.name in RELEASE_AFTER_EACH_TEST:
        _release()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test file. Every XLA:CPU executable keeps
    its JIT code mapped (8,000-15,000 mappings per test file here), and a worker that
    runs many files reaches the kernel's limit on mappings (vm.max_map_count, 65,530):
    LLVM then fails with "Cannot allocate memory" and the worker dies."""
    yield
    _release()


def _release() -> None:
    """Drop JAX's compiled programs (and the executables they keep mapped)."""
    jax.clear_caches()
    gc.collect()
