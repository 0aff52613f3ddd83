"""Broken inputs through the real `hybrid-twin` command, in subprocesses: each one ends
with exit code 2 (bad input) or 1 (a failing environment), a message that names the file
(with line and column where there is one) or the config key, and no traceback.

Every case but the full disk of `run` (which reads the data, a few small array operations,
before its first write) fails before any JAX compilation, and the tests check that from the
CLI's compilation count; so the cost is the interpreter's start and imports (~1.5 s CPU
each). The module fixture runs all cases four at a time and each test checks one case's
result.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hybrid_twin.compile_cache import parse_summary
from hybrid_twin.config import ConfigError
from hybrid_twin.errors import RunFailed

REPO = Path(__file__).resolve().parents[1]
THEO = "configs/theophylline.yaml"
QUICK = "configs/quickstart.yaml"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _unwritable_for_root() -> str | None:
    """A directory in which even root cannot create anything (sysfs on Linux: EPERM),
    or None where there is none."""
    probe = Path("/sys/hybrid-twin-probe")
    try:
        probe.mkdir()
    except PermissionError:
        return str(probe.parent)
    except OSError:
        return None
    probe.rmdir()
    return None


UNWRITABLE = _unwritable_for_root() if IS_ROOT else None
HEADER = "ID,TIME,EVID,DV,OBS,AMT,RATE,CMT,MDV\n"
DOSE = "1,0,1,,,320,0,depot,1\n"
PREDICTIONS = "ID,TIME,OBS,DV,PRED,PRED_LO,PRED_HI,SPLIT,STATUS\n"
COMPILATIONS = re.compile(r"^compilations: \d+ \(persistent cache hits: \d+\)\n", re.M)


@dataclasses.dataclass(frozen=True)
class Case:
    """`argv` after `hybrid-twin` ({d}: the scratch folder), the expected exit code and
    substrings of stderr. `compiles`: the case may run JAX computations before it fails."""

    argv: tuple[str, ...]
    code: int
    expect: tuple[str, ...]
    cwd: str | None = None
    fsize_limit: int | None = None
    compiles: bool = False
    skip: str | None = None


def run_case(name: str, *argv: str, code: int = 2, expect: tuple[str, ...] = (),
             **kw) -> tuple[str, Case]:
    return name, Case(tuple(argv), code, expect, **kw)


def csv_case(name: str, file: str, *expect: str) -> tuple[str, Case]:
    return run_case(name, "run", THEO, "--set", f"data.path={{d}}/{file}", "--out",
                    f"{{d}}/out/{name}", expect=(f"{{d}}/{file}", *expect))


def config_case(name: str, file: str, *expect: str, names_file: bool = True):
    return run_case(name, "run", f"{{d}}/{file}", "--out", f"{{d}}/out/{name}",
                    expect=(f"{{d}}/{file}",) * names_file + expect)


def set_case(name: str, *sets: str, expect: tuple[str, ...], config: str = QUICK):
    argv = [x for s in sets for x in ("--set", s)]
    return run_case(name, "run", config, *argv, "--out", f"{{d}}/out/{name}", expect=expect)


CASE_LIST = [
    # event tables (data.source csv)
    csv_case("csv_missing_id", "no_id.csv", "line 1: missing required column(s) ID"),
    csv_case("csv_time_not_a_number", "time_text.csv",
             "time_text.csv:3: TIME 'abc' is not a number"),
    csv_case("csv_negative_time", "neg_time.csv", "neg_time.csv:3: TIME -1 is negative"),
    csv_case("csv_ragged_row", "ragged.csv", "ragged.csv:3: 4 fields, expected 9"),
    csv_case("csv_header_only", "header_only.csv", "line 2: the file has a header but no rows"),
    csv_case("csv_empty", "empty.csv", "line 1: the file is empty"),
    csv_case("csv_nonexistent", "nope.csv", "data.path: file not found"),
    csv_case("data_path_is_a_directory", "a_dir", "data.path:", "is a directory"),
    csv_case("data_path_is_yaml", "config.yaml", "data.path:", "is a YAML file"),
    csv_case("csv_is_hdf5", "truncated.h5", "data.path:", "is an HDF5 file",
             "data.source: hdf5"),
    run_case("hdf5_source_given_a_csv", "run", THEO, "--set", "data.source=hdf5", "--out",
             "{d}/out/h1", expect=("data.path:", "theophylline.csv", "data.source: csv")),
    run_case("hdf5_text_with_h5_suffix", "run", THEO, "--set", "data.source=hdf5", "--set",
             "data.path={d}/text.h5", "--out", "{d}/out/h2",
             expect=("data.path: {d}/text.h5", "not an HDF5 file")),
    run_case("hdf5_truncated", "run", THEO, "--set", "data.source=hdf5", "--set",
             "data.path={d}/truncated.h5", "--out", "{d}/out/h3",
             expect=("{d}/truncated.h5", "truncated or corrupted")),
    # config files
    config_case("config_empty", "empty.yaml", "the config file is empty"),
    config_case("config_comments_only", "comments.yaml", "the config file is empty"),
    config_case("config_binary", "binary.yaml", "binary file (NUL byte at byte offset 4)"),
    config_case("config_not_utf8", "latin1.yaml", "not UTF-8 text (byte 0xe9 at byte offset 9)"),
    config_case("config_duplicate_key", "duplicate.yaml", "duplicate.yaml:4:1: duplicate key "
                "'population' (first at line 2, column 1)"),
    config_case("config_yaml_syntax", "syntax.yaml", "syntax.yaml:3:", "expected ',' or ']'",
                "line 2, column 15"),
    config_case("config_is_a_directory", "a_dir", "is a directory, not a config file"),
    config_case("config_unknown_key", "typo.yaml", "unknown config key 'evalution'; did you "
                "mean 'evaluation'?", names_file=False),
    config_case("config_wrong_type", "wrong_type.yaml", "data.virtual.n: expected an integer, "
                "got 'many'", names_file=False),
    # config values, through --set
    set_case("unknown_model", "model.name=pkpd.OneCompartmnt",
             expect=("model.name: unknown model", "did you mean 'pkpd.OneCompartment'")),
    set_case("negative_seed", "seed=-1", expect=("seed: must be >= 0",)),
    set_case("error_sd_zero_fixed", "error_model={kind: additive, additive: 0, estimate: false}",
             expect=("error_model.additive: must be a finite number > 0",)),
    set_case("split_fractions", "split.train=0.9", expect=("split: train + val + test",)),
    set_case("unknown_backend", "solver.backend=cuda", expect=("solver.backend: 'cuda' is not "
                                                               "one of",)),
    set_case("rk4_without_dt0", "solver.method=rk4", expect=("solver:", "dt0")),
    set_case("learned_unknown_state", "model.learned=[{kind: state_correction, states: [Q9]}]",
             expect=("model.learned[0].states[0]: 'Q9' is not a state",)),
    set_case("set_without_equals", "foo", expect=("--set 'foo': expected KEY.SUB=VALUE",)),
    set_case("set_unclosed_list", "data.path=[1",
             expect=("--set 'data.path=[1': column 3:", "expected ',' or ']'")),
    set_case("set_unknown_key", "data.virtual.nn=5",
             expect=("unknown config key 'data.virtual.nn'; did you mean 'data.virtual.n'",)),
    run_case("pseudonym_key_missing", "run", THEO, "--pseudonymise", "--out", "{d}/out/p",
             expect=("data.pseudonymise is true but there is no key: set the environment "
                     "variable HYBRID_TWIN_PSEUDONYM_KEY",)),
    set_case("pseudonym_map_without_pseudonymise", "data.pseudonym_map={d}/map.csv",
             expect=("data.pseudonym_map is set but data.pseudonymise is false",)),
    set_case("event_table_option_for_virtual_data", "data.categorical=one_hot",
             expect=("data.categorical: only csv event tables use it, and data.source is "
                     "'virtual'",)),
    # the device: this machine's JAX sees only the CPU (JAX_PLATFORMS=cpu); run from another
    # directory, which also checks that the config's relative data.path is found from there
    run_case("device_gpu_without_gpu", "run", str(REPO / THEO), "--set", "device=gpu",
             "--out", "{d}/out/gpu", cwd="{d}",
             expect=("device: gpu requested but JAX sees only cpu devices",)),
    # the file system
    run_case("out_is_a_file", "run", QUICK, "--out", "{d}/a_file",
             expect=("--out {d}/a_file", "is not a directory")),
    run_case("out_read_only", "run", THEO, "--out", "{d}/read_only/run", code=1,
             expect=("{d}/read_only/run", "Permission denied"), compiles=True,
             skip="chmod does not stop root from writing" if IS_ROOT else None),
    # (as root: a directory no permission bit protects, where the kernel refuses writes)
    run_case("out_not_permitted", "run", THEO, "--out", f"{UNWRITABLE}/hybrid-twin-run",
             code=1, expect=(f"{UNWRITABLE}/hybrid-twin-run", "Operation not permitted"),
             compiles=True, skip=None if UNWRITABLE else "runs as root, on Linux"),
    run_case("disk_full", "run", THEO, "--out", "{d}/out/full", code=1, fsize_limit=1024,
             expect=("{d}/out/full", "File too large (EFBIG)"), compiles=True),
    run_case("disk_full_evaluate", "evaluate", "{d}/finished", code=1, fsize_limit=64,
             expect=("writing in {d}/finished: File too large (EFBIG)",)),
    # evaluate
    run_case("evaluate_missing_dir", "evaluate", "{d}/no_run",
             expect=("{d}/no_run: not found",)),
    run_case("evaluate_not_a_run_dir", "evaluate", "{d}/a_dir",
             expect=("{d}/a_dir: no run.json",)),
    run_case("evaluate_unfinished_run", "evaluate", "{d}/unfinished",
             expect=("{d}/unfinished: the run has not finished",)),
    run_case("evaluate_torn_row", "evaluate", "{d}/torn_short",
             expect=("{d}/torn_short/predictions.csv:3: expected 9 fields, got 4",)),
    run_case("evaluate_not_a_number", "evaluate", "{d}/torn_text",
             expect=("{d}/torn_text/predictions.csv:2: column DV: expected a number, got "
                     "'abc'",)),
    # a run directory that holds a run of another config: resume refused
    run_case("resume_another_config", "run", THEO, "--out", "{d}/other_run",
             expect=("{d}/other_run holds a run of a different config", "--force-restart")),
    # simulate, models, arguments
    run_case("simulate_bad_config", "simulate", QUICK, "--set", "data.virtual.nn=3", "--out",
             "{d}/out/sim", expect=("did you mean 'data.virtual.n'",)),
    run_case("simulate_model_from_not_a_run", "simulate", QUICK, "--model-from", "{d}/a_dir",
             "--out", "{d}/out/sim3", expect=("--model-from {d}/a_dir: not a run directory",)),
    run_case("models_unknown", "models", "NOSUCH", expect=("invalid choice: 'NOSUCH'",)),
]
CASES: dict[str, Case] = dict(CASE_LIST)


def write_inputs(d: Path) -> None:
    """The broken files the cases read, in `d`."""
    files = {
        "no_id.csv": "TIME,DV\n0,1.0\n",
        "time_text.csv": HEADER + DOSE + "1,abc,0,5.0,concentration,,,,0\n",
        "neg_time.csv": HEADER + DOSE + "1,-1,0,5.0,concentration,,,,0\n",
        "ragged.csv": HEADER + DOSE + "1,1,0,5.0\n",
        "header_only.csv": HEADER,
        "empty.csv": "",
        "text.h5": HEADER + DOSE,
        "config.yaml": "name: a config, not data\n",
        "empty.yaml": "",
        "comments.yaml": "# nothing here yet\n\n   # still nothing\n",
        "duplicate.yaml": "name: dup\npopulation: {fit: true}\nseed: 1\npopulation:\n"
                          "  fit: false\n",
        "syntax.yaml": "name: x\nmodel: {free: [p1, p3\n",
        "typo.yaml": "name: x\nevalution: {}\n",
        "wrong_type.yaml": "data:\n  virtual: {n: many}\n",
        "a_file": "not a directory\n",
        "torn_short/predictions.csv": PREDICTIONS + "1,1.0,glucose,100.0,101.0,90.0,110.0,"
                                                    "test,ok\n1,2.0,glucose,100.0\n",
        "torn_text/predictions.csv": PREDICTIONS + "1,1.0,glucose,abc,101.0,90.0,110.0,test,"
                                                   "ok\n",
        "unfinished/predictions.csv": PREDICTIONS,
        "finished/predictions.csv": PREDICTIONS + "1,1.0,glucose,100.0,101.0,90.0,110.0,test,"
                                                  "ok\n",
        "other_run/config.yaml": "name: another experiment\n",
    }
    for name, text in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    # finished runs (run.json written last), two with a predictions.csv damaged
    # afterwards, a run that never finished, and a finished run of another config
    finished = {"status": "complete", "completed": ["train", "calibrate", "predict"]}
    for run, record in (("torn_short", finished), ("torn_text", finished),
                        ("finished", finished),
                        ("unfinished", {"status": "running", "completed": ["train"]}),
                        ("other_run", {**finished, "config_sha256": "0" * 64})):
        if run != "other_run":
            (d / run / "config.yaml").write_text(f"name: {run}\n")
        (d / run / "run.json").write_text(json.dumps(record))
    (d / "binary.yaml").write_bytes(b"name\x00\x01\x02\xff")
    (d / "latin1.yaml").write_bytes("name: caf\u00e9 caf\u00e9\n".encode("latin-1"))
    (d / "a_dir").mkdir()
    (d / "out").mkdir()
    (d / "read_only").mkdir()
    (d / "read_only").chmod(0o555)
    import h5py

    with h5py.File(d / "full.h5", "w") as f:
        f.attrs["format"] = "hybrid_twin.cohort"
        f.create_dataset("x", data=np.arange(20_000.0))
    (d / "truncated.h5").write_bytes((d / "full.h5").read_bytes()[:4096])


def command(case: Case, d: Path) -> list[str]:
    argv = [a.replace("{d}", str(d)) for a in case.argv]
    cli = [sys.executable, "-m", "hybrid_twin.cli", *argv]
    if case.fsize_limit is None:
        return cli
    # a full disk: no file may grow past fsize_limit bytes (EFBIG; SIGXFSZ ignored); set in
    # a small launcher that execs the CLI, as preexec_fn is unsafe with threads
    launcher = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, "
                "signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, "
                f"({case.fsize_limit}, {case.fsize_limit})); os.execv(sys.executable, "
                "sys.argv[1:])")
    return [sys.executable, "-c", launcher, *cli]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    d = tmp_path_factory.mktemp("broken")
    write_inputs(d)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYBRID_TWIN_COMPILE_CACHE": "off",
           "JAX_PLATFORMS": "cpu", "PYTHONDONTWRITEBYTECODE": "1",
           "HYBRID_TWIN_LOG_COMPILES": "1"}
    env.pop("HYBRID_TWIN_PSEUDONYM_KEY", None)

    def launch(case: Case) -> subprocess.CompletedProcess:
        cwd = case.cwd.replace("{d}", str(d)) if case.cwd else str(REPO)
        return subprocess.run(command(case, d), cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=300)

    todo = {name: case for name, case in CASES.items() if case.skip is None}
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(launch, case) for name, case in todo.items()}
        out = {name: f.result() for name, f in futures.items()}
    (d / "read_only").chmod(0o755)
    return {"dir": d, **out}


def test_there_are_enough_distinct_cases():
    assert len(CASES) == len(CASE_LIST) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_broken_input_gives_a_clean_error(results, name):
    case = CASES[name]
    if case.skip:
        pytest.skip(case.skip)
    res, d = results[name], results["dir"]
    err = res.stderr
    if not err.startswith("usage:"):   # past argument parsing: the compilation count
        assert parse_summary(err)[0] == 0 or case.compiles, err
        err = COMPILATIONS.sub("", err)
    assert "Traceback" not in err, err
    assert res.stdout.count("\n") < 5, res.stdout  # nothing ran
    assert res.returncode == case.code, err
    for text in case.expect:
        text = text.replace("{d}", str(d))
        assert text in err, f"{text!r} not in {err!r}"
    lines = err.strip().splitlines()
    if err.startswith("usage:"):  # argparse's own usage error
        assert lines[-1].startswith("hybrid-twin ")
        return
    assert lines[0].startswith("hybrid-twin: error: "), err
    if ": problem(s) in the event table:" not in lines[0]:
        assert len(lines) <= 2, err


# The command line's own checks and its error reporting, in this process (no subprocess
# needed: `main` returns the exit code).

def test_argument_checks(tmp_path, capsys):
    from hybrid_twin.cli import main

    (tmp_path / "a_file").write_text("x\n")
    assert main(["run", QUICK, "--out", str(tmp_path / "a_file" / "run")]) == 2
    assert f"{tmp_path / 'a_file'} exists and is not a directory" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "a_file")]) == 2
    assert f"{tmp_path / 'a_file'}: not a directory" in capsys.readouterr().err
    assert main(["simulate", "--set", "seed=1", "--out", str(tmp_path / "s")]) == 2
    assert "need a CONFIG" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    for argv, message in ((["simulate", "--seed", "-1"], "--seed: must be >= 0"),
                          (["simulate", QUICK, "--chunk", "0"], "--chunk: must be >= 1")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    # --debug (before or after the subcommand) shows the exception itself
    for argv in (["--debug", "run", QUICK, "--set", "seed=-1"],
                 ["run", QUICK, "--set", "seed=-1", "--debug"]):
        with pytest.raises(ConfigError, match="seed: must be >= 0"):
            main(argv)


@pytest.mark.parametrize("error, code, message", [
    (ConfigError("device: gpu requested but JAX sees only cpu devices"), 2,
     "hybrid-twin: error: device: gpu requested but JAX sees only cpu devices"),
    (RunFailed("every patient failed (solver: max steps)"), 1,
     "hybrid-twin: run failed: every patient failed (solver: max steps)"),
    (KeyboardInterrupt(), 130, "hybrid-twin: interrupted"),
    (PermissionError(13, "Permission denied", "/x/run/config.yaml"), 1,
     "hybrid-twin: error: /x/run/config.yaml: Permission denied (EACCES)"),
    (OSError(28, "No space left on device"), 1,
     "hybrid-twin: error: No space left on device (ENOSPC)"),
    (KeyError("TIME"), 1, "hybrid-twin: internal error: KeyError: 'TIME' (rerun with --debug "
                          "for the traceback)"),
])
def test_report_error_maps_exceptions_to_exit_codes(capsys, error, code, message):
    from hybrid_twin.cli import report_error

    assert report_error(error) == code
    assert capsys.readouterr().err.strip() == message


def test_a_write_that_names_no_file_names_the_directory(tmp_path, capsys):
    from hybrid_twin.cli import _writing_in, report_error

    with pytest.raises(OSError) as e:
        with _writing_in(tmp_path / "run"):
            raise OSError(27, "File too large")
    assert report_error(e.value) == 1
    assert capsys.readouterr().err.strip() == \
        f"hybrid-twin: error: writing in {tmp_path / 'run'}: File too large (EFBIG)"
