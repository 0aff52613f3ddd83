"""The errors hybrid_twin raises for bad input, and how the command line shows them.

Every rejection of something the user supplied (a config file or key, a data file, a run
directory) is an `InputError`: its message alone tells the user what to fix, naming the
file (with line and column where there is one) or the config key, and what was expected.
The command line prints it in one or two lines and exits with `EXIT_INPUT` (2), without a
traceback. A config that asks for a device the host lacks (`device: gpu` where JAX sees no
GPU) is such an input error too (`hybrid_twin.config.ConfigError` naming `device`), found
before any work starts. Failures of the environment while a run works (a read-only or full
disk, missing permissions) exit with `EXIT_ENVIRONMENT` (1). Library callers catch
`InputError` (a `ValueError`) as usual.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ENVIRONMENT = 1
"""Exit code for a failure of the environment (disk, permissions), or of the run itself
(every patient failed)."""
EXIT_INPUT = 2
"""Exit code for bad input: config (a requested device that is missing included), data,
command-line arguments, run directory."""


class InputError(ValueError):
    """Bad user input; the message names the file/line/column or config key and what was
    expected. The command line prints it and exits with code 2."""


class RunDirectoryError(InputError):
    """A run directory that cannot be used as asked: it holds a run of other data, config
    or code (resume refused), or an unfinished run given to `evaluate`."""


class RunFailed(RuntimeError):
    """A run that finished writing its outputs but in which every patient failed (or a
    stage diverged); the run directory records why. The command line exits with code 1."""
