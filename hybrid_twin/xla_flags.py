"""Workarounds for known XLA:CPU compiler faults, applied through `XLA_FLAGS`.

jaxlib 0.10.2 and 0.11 turn on XLA:CPU's YNNPACK fusions (`__ynn_fusion`) by default. They
can abort the process or hang while compiling some dot and reduce fusions
(jax-ml/jax#39257, #39264; fixed in XNNPACK after those releases). Calibration's
Levenberg–Marquardt loop and normal equations compile to such fusions, so on those
releases `apply()` switches the YNN fusions off for the CPU backend
(`--xla_cpu_experimental_ynn_fusion_type=`). The CPU then computes the same products with
XLA's own emitters; results agree to rounding, and our cohorts' matrices are far too small
for the library kernels to matter.

The `hybrid-twin` command, `python -m benchmarks.*` and the test suite call `apply()` before
JAX creates its backends. A library user on an affected jaxlib calls it the same way, first
thing, or sets the flag in `XLA_FLAGS`. A flag the user already set for the same option is
left alone, and `HYBRID_TWIN_XLA_WORKAROUNDS=off` switches every workaround off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping

import jaxlib
from jax._src import xla_bridge as _xla_bridge

logger = logging.getLogger("hybrid_twin")

ENV_SWITCH = "HYBRID_TWIN_XLA_WORKAROUNDS"
"""`off`, `0`, `false` or `no` turns every workaround off."""

YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
YNN_OFF = f"--{YNN_OPTION}="
# jaxlib releases whose XLA:CPU has the YNN fusions on by default and the faults above
# (0.10.2 up to, not including, 0.12; earlier releases do not know the option, and an
# unknown option aborts XLA).
_YNN_AFFECTED = ((0, 10, 2), (0, 12, 0))


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def workaround_flags(jaxlib_version: str, xla_flags: str = "") -> list[str]:
    """The `XLA_FLAGS` entries this jaxlib version needs that `xla_flags` does not set.

    Args:
        jaxlib_version: e.g. `jaxlib.__version__`.
        xla_flags: the current `XLA_FLAGS`; an option already set there is never
            overridden.
    """
    low, high = _YNN_AFFECTED
    if low <= _version_tuple(jaxlib_version) < high and YNN_OPTION not in xla_flags:
        return [YNN_OFF]
    return []


def apply(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Append the workaround flags for the installed jaxlib to `XLA_FLAGS`.

    Must run before JAX creates its backends (XLA reads `XLA_FLAGS` once, then); later,
    it changes nothing and logs a warning. Returns the flags it added.

    Args:
        environ: the environment to change; `os.environ` by default.
    """
    env = os.environ if environ is None else environ
    if env.get(ENV_SWITCH, "").strip().lower() in ("off", "0", "false", "no"):
        return []
    current = env.get("XLA_FLAGS", "")
    flags = workaround_flags(jaxlib.__version__, current)
    if not flags:
        return []
    if environ is None and _xla_bridge.backends_are_initialized():
        logger.warning("XLA workarounds not applied: JAX's backends already exist; set "
                       "XLA_FLAGS=%r before JAX starts", " ".join(flags))
        return []
    env["XLA_FLAGS"] = " ".join([current, *flags]).strip()
    return flags
