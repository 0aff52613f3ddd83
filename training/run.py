"""`hybrid-twin run CONFIG`: data -> split -> population -> calibration -> forecast ->
metrics, predictions, parameters and plots in a run directory (DESIGN.md contract)."""

from __future__ import annotations

import collections
import csv
import dataclasses
import datetime
import hashlib
import io
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import yaml

from hybrid_twin._atomic import atomic_open, atomic_write_text, remove_orphans
from hybrid_twin.config import (
    ExperimentConfig,
    resolved,
    solver_options,
    training_condition_until,
)
from hybrid_twin.errors import InputError, RunDirectoryError, RunFailed


class Log:
    """JSON-lines log in the run directory, echoed to the terminal."""

    def __init__(self, path: Path):
        self.path = path
        self.t0 = time.perf_counter()

    def __call__(self, event: str, **fields) -> None:
        rec = {"t_s": round(time.perf_counter() - self.t0, 3), "event": event, **fields}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        extra = " ".join(f"{k}={v}" for k, v in fields.items() if not isinstance(v, (dict, list)))
        print(f"[{rec['t_s']:8.1f}s] {event} {extra}".rstrip(), flush=True)


def _setup_device(cfg: ExperimentConfig) -> None:
    """float64 available; `device: cpu` pins JAX to the CPU, `device: gpu` must find a GPU
    (`check_device`: a `ConfigError` otherwise)."""
    import jax

    from hybrid_twin.config import check_device

    jax.config.update("jax_enable_x64", True)
    if cfg.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    check_device(cfg)


def build_model(cfg: ExperimentConfig, mechanistic):
    """The mechanistic model, or a HybridModel with the configured learned terms."""
    if not cfg.model.learned:
        return mechanistic
    import jax

    from hybrid_twin.hybrid import (
        HybridModel,
        covariate_network,
        input_states_of,
        latent_names,
        neural_ode,
        state_correction,
        term_closure,
    )

    keys = jax.random.split(jax.random.PRNGKey(cfg.seed), len(cfg.model.learned))
    corrections, closures, covariate_net = [], [], None
    day = cfg.model.learned[0].day_length or (1440.0 if mechanistic.time_unit == "min" else 24.0)
    for key, lt in zip(keys, cfg.model.learned):
        scales = {k: tuple(v) for k, v in lt.feature_scales.items()}
        if lt.kind == "neural_ode":
            inputs = input_states_of(mechanistic, lt.input_states)
            return neural_ode(mechanistic, key=key, width=lt.width, depth=lt.depth,
                              features=lt.features or None, feature_scales=scales,
                              out_scale=lt.out_scale, day_length=day,
                              latent=cfg.model.latent_states, input_states=inputs,
                              states=lt.states or None)
        if lt.kind == "covariate_network":
            covariate_net = covariate_network(
                mechanistic, lt.params, lt.covariates, key=key, width=lt.width,
                depth=lt.depth, feature_scales=scales, out_scale=lt.out_scale)
        elif lt.kind == "state_correction":
            corrections.append(state_correction(
                mechanistic, lt.states, lt.features, key=key, width=lt.width, depth=lt.depth,
                feature_scales=scales, out_scale=lt.out_scale))
        else:
            closures.append(term_closure(
                mechanistic, lt.term, lt.features, key=key, width=lt.width, depth=lt.depth,
                feature_scales=scales, out_scale=lt.out_scale, mode=lt.mode))
    return HybridModel(mechanistic, tuple(corrections), tuple(closures), covariate_net,
                       day_length=day, latent=latent_names(cfg.model.latent_states))


def load_trained_model(run_dir: str | os.PathLike):
    """The trained (hybrid) model of a run directory: its `config.yaml` rebuilt and the
    learned weights read from `model.eqx` (written when training ends)."""
    import equinox as eqx

    from hybrid_twin.config import load_config
    from hybrid_twin.models import get_model

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    _setup_device(cfg)
    skeleton = build_model(cfg, get_model(cfg.model.name))
    if not cfg.model.learned:
        return skeleton
    path = run_dir / "model.eqx"
    if not path.exists():
        raise RunDirectoryError(f"{path}: no trained model (has the run finished training?)")
    try:
        with open(path, "rb") as fh:
            return eqx.tree_deserialise_leaves(fh, skeleton)
    except Exception as e:  # noqa: BLE001 - any unreadable model file is reported alike
        raise RunDirectoryError(f"{path}: unreadable trained model ({type(e).__name__}: "
                                f"{e})") from None


def build_cohort(cfg: ExperimentConfig, model, *, for_simulation: bool = False,
                 run_dir: str | os.PathLike | None = None, notes: dict | None = None,
                 truth=None):
    """The configured data as a Cohort and, for a virtual source, its `VirtualCohort`
    (simulated with the configured solver): `hybrid_twin.data.load_cohort` with every
    check and option of the `data` block (patients without observations are allowed only
    `for_simulation`; the pseudonym map is refused inside `run_dir`). The config's paths
    are absolute (`load_config` resolves them against the config file). `notes`, when a
    dict, receives what the import did besides reading (conversions, columns ignored or
    encoded, pseudonymisation; no raw ID), for the run's log. `truth`: the model that
    simulates a virtual cohort (default `model`), whose data are then expressed in
    `model`'s observables and dose targets."""
    from hybrid_twin.data.load import load_cohort

    cohort, vc, done = load_cohort(cfg.data, model, options=solver_options(cfg),
                                   for_simulation=for_simulation, run_dir=run_dir,
                                   truth=truth)
    if notes is not None:
        notes.update(done)
    return cohort, vc


def _calibrate_split(path: Path, log, split, model, cohort, **kw):
    """Calibrate a split, or load its checkpoint from an interrupted run."""
    import equinox as eqx
    import jax

    from hybrid_twin.calibrate import CalibrationResult, calibrate, fit_dtype

    if path.exists():
        n, p, f = cohort.n_patients, model.n_params, len(kw["free"])
        dtype = fit_dtype(cohort, kw.get("options"))  # what the checkpoint was written in

        def zeros(shape, dt=dtype):
            return jax.numpy.zeros(shape, dt)

        skeleton = CalibrationResult(
            params=zeros((n, p)), z=zeros((n, f)), cov_z=zeros((n, f, f)), se=zeros((n, p)),
            corr=zeros((n, f, f)), cost=zeros((n,)), converged=zeros((n,), bool),
            status=zeros((n,), jax.numpy.int32), n_data=zeros((n,), jax.numpy.int32),
            n_iter=0, free=tuple(kw["free"]), error_model=kw["error_model"])
        try:
            with open(path, "rb") as fh:
                res = eqx.tree_deserialise_leaves(fh, skeleton)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is reported alike
            raise RunDirectoryError(
                f"{path}: unreadable calibration checkpoint ({type(e).__name__}: {e}); "
                "start over with --force-restart") from None
        log("calibration", split=split, resumed=True)
        return res
    t0 = time.perf_counter()
    max_iter = kw["max_iter"]

    def progress(it, n_conv, seconds):
        eta = seconds / it * (max_iter - it)
        print(f"\r  calibrating {split}: iteration {it}/{max_iter}, {n_conv}/"
              f"{cohort.n_patients} converged, {seconds:.1f} s, ETA <= {eta:.0f} s",
              end="", flush=True)

    res = calibrate(model, cohort, progress=progress, **kw)
    print()
    with atomic_open(path, "wb") as fh:
        eqx.tree_serialise_leaves(fh, res)
    log("calibration", split=split, seconds=round(time.perf_counter() - t0, 2),
        converged=int(np.sum(np.asarray(res.converged))))
    return res


def _metrics(model, cohort, pred, lo, hi, mask, names=("rmse", "mae")) -> dict:
    """Metrics per observable on `mask`: rmse and mae always, bias and coverage (of the
    95% prediction intervals) on request; n is the number of observations used."""
    y = np.asarray(cohort.obs_values)
    k = np.asarray(cohort.obs_index)
    wanted = ["rmse", "mae", *[m for m in names if m not in ("rmse", "mae")]]
    out = {m: {} for m in wanted}
    out["n"] = {}
    for j, name in enumerate(model.observable_names):
        sel = mask & (k == j)
        if not sel.any():
            continue
        err = pred[sel] - y[sel]
        values = {"rmse": float(np.sqrt(np.mean(err ** 2))), "mae": float(np.mean(np.abs(err))),
                  "bias": float(np.mean(err)),
                  "coverage": float(np.mean((lo[sel] <= y[sel]) & (y[sel] <= hi[sel])))}
        for m in wanted:
            out[m][name] = values[m]
        out["n"][name] = int(sel.sum())
    return out


STAGES = ("train", "calibrate", "predict")

RUN_PRODUCTS = ("checkpoints", "config.yaml", "run.json", "params.csv", "predictions.csv",
                "metrics.json", "model.eqx", "log.jsonl", "fits.png", "pred_vs_obs.png",
                "vpc.png", "training.png")
"""What a run writes in its directory (all that `force_restart` removes)."""


def strict_json(obj) -> str:
    """`obj` as strict JSON (indented, newline-terminated): NaN and infinities become
    null, so any JSON parser reads it."""

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, (float, np.floating)):
            return float(x) if np.isfinite(x) else None
        if isinstance(x, np.integer):
            return int(x)
        if isinstance(x, np.bool_):
            return bool(x)
        return x

    return json.dumps(clean(obj), indent=2, allow_nan=False) + "\n"


def _data_fingerprint(cfg: ExperimentConfig) -> dict:
    """What identifies the run's input data: {"source", "path", "sha256"}, the sha256 of
    the file's bytes (csv, hdf5) or of the virtual-data config section (virtual)."""
    from hybrid_twin.data.load import data_fingerprint

    try:
        sha = data_fingerprint(cfg.data)
    except OSError as e:
        raise InputError(f"data.path: cannot read {cfg.data.path}: {e.strerror or e}") from None
    path = str(cfg.data.path) if cfg.data.source in ("csv", "hdf5") else None
    return {"source": cfg.data.source, "path": path, "sha256": sha}


def code_version() -> dict:
    """{"hybrid_twin": the package version, "git": the commit of the repository the package
    is in (None when it is not in one, or git is missing)}."""
    import subprocess

    import hybrid_twin

    package = Path(hybrid_twin.__file__).resolve().parent
    commit = None
    try:
        out = subprocess.run(["git", "-C", str(package), "rev-parse", "--show-toplevel",
                              "HEAD"], capture_output=True, text=True, timeout=10)
        lines = out.stdout.split()
        if out.returncode == 0 and len(lines) == 2 and \
                Path(lines[0]).resolve() == package.parent:
            commit = lines[1]
    except (OSError, subprocess.SubprocessError):
        pass
    return {"hybrid_twin": hybrid_twin.__version__, "git": commit}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _flat(d, prefix="") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def read_run_record(run_dir: str | os.PathLike) -> dict | None:
    """The run directory's `run.json` (None if it has none); `RunDirectoryError` if it is
    unreadable."""
    path = Path(run_dir) / "run.json"
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirectoryError(f"{path}: unreadable run record ({e}); start over with "
                                "--force-restart or choose another --out") from None
    if not isinstance(record, dict) or "status" not in record:
        raise RunDirectoryError(f"{path}: not a run record (no 'status'); start over with "
                                "--force-restart or choose another --out")
    return record


def _check_resume(run_dir: Path, config_text: str, fingerprint: dict) -> dict:
    """The run record of `run_dir`, if the run it holds is of this config, data and code;
    else `RunDirectoryError` saying what changed and how to proceed."""
    record = read_run_record(run_dir)
    how = ("start over with --force-restart, or choose another --out")
    if record is None:
        raise RunDirectoryError(
            f"{run_dir} holds checkpoints but no run.json (a run from an older version, or "
            f"one killed before it began): its data and config cannot be checked; {how}")
    changes = []
    if record.get("config_sha256") != fingerprint["config_sha256"]:
        old_path = run_dir / "config.yaml"
        try:
            old = _flat(yaml.safe_load(old_path.read_text()) or {})
        except (OSError, yaml.YAMLError):
            old = None
        if old is None:
            changes.append("the config differs (its config.yaml is missing or unreadable)")
        else:
            new = _flat(yaml.safe_load(config_text))
            keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            shown = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:8]]
            more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
            changes.append("a different config (changed: " + "; ".join(shown) + more + ")")
    old_data, new_data = record.get("data") or {}, fingerprint["data"]
    if old_data.get("sha256") != new_data.get("sha256"):
        a, b = str(old_data.get("sha256"))[:12], str(new_data.get("sha256"))[:12]
        if new_data.get("path") and old_data.get("path") == new_data.get("path"):
            changes.append(f"the data file {new_data['path']} changed since the run began "
                           f"(sha256 {a}… -> {b}…)")
        else:
            changes.append(f"different data ({old_data.get('source')} "
                           f"{old_data.get('path') or ''} sha256 {a}… -> "
                           f"{new_data.get('source')} {new_data.get('path') or ''} sha256 "
                           f"{b}…)".replace("  ", " "))
    if record.get("code") != fingerprint["code"]:
        changes.append(f"other code (hybrid_twin {record.get('code')} -> "
                       f"{fingerprint['code']})")
    if changes:
        raise RunDirectoryError(f"{run_dir} holds a run of " + "; and ".join(changes)
                                + f": resume refused; {how}")
    return record


def _remove_products(run_dir: Path) -> None:
    """Delete what a run wrote in `run_dir` (`RUN_PRODUCTS` and its temporary files),
    nothing else."""
    for name in RUN_PRODUCTS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    remove_orphans(run_dir)


class RunRecord:
    """`run.json`: the run's fingerprint (config sha256, data, code), its status
    ("running", "complete" or "failed" with a reason), the completed stages and the
    start and end times; written atomically at every change."""

    def __init__(self, run_dir: Path, fingerprint: dict, previous: dict | None):
        self.path = run_dir / "run.json"
        done = (previous or {}).get("completed") or []
        self.data = {"status": "running", "completed": [s for s in STAGES if s in done],
                     "reason": None, **fingerprint,
                     "created": (previous or {}).get("created") or _now(),
                     "started": _now(), "ended": None, "resumed": previous is not None}

    def _write(self) -> None:
        atomic_write_text(self.path, strict_json(self.data))

    def running(self) -> None:
        self._write()

    def complete(self, stage: str) -> None:
        upto = STAGES[: STAGES.index(stage) + 1]
        self.data.update(status="complete", ended=_now(), reason=None,
                         completed=[s for s in STAGES
                                    if s in upto or s in self.data["completed"]])
        self._write()

    def failed(self, stage: str, reason: str) -> None:
        self.data.update(status="failed", ended=_now(), failed_stage=stage, reason=reason)
        self._write()


def _check_inputs(cfg: ExperimentConfig, cohort, parts: dict) -> None:
    """Refuse (`InputError`) a forecast cut outside the data's observation times, and
    hybrid training whose validation patients have nothing after the cut to score."""
    cond = cfg.evaluation.condition_until
    t = np.asarray(cohort.obs_times)[np.asarray(cohort.data_mask)]
    if cond is not None and t.size:
        first, last = float(t.min()), float(t.max())
        if not first <= cond < last:
            where = "before the first" if cond < first else "at or after the last"
            data = cfg.data.path if cfg.data.source != "virtual" else "virtual cohort"
            raise InputError(
                f"evaluation.condition_until: {cond:g} is {where} observation time of the "
                f"data ({data}: observations from {first:g} to {last:g}); choose a time in "
                f"[{first:g}, {last:g})")
    val = parts.get("val")
    if cfg.model.learned and val is not None and not val.n_patients:
        raise InputError(
            f"split.val: {cfg.split.val:g} of {cohort.n_patients} patients gives no "
            "validation patient, and training learned terms (model.learned) needs them to "
            "stop when the forecast stops improving; raise split.val or add patients")
    if cfg.model.learned and val is not None and val.n_patients and not bool(
            np.any(np.asarray(val.score_mask(cond)))):
        tv = np.asarray(val.obs_times)[np.asarray(val.data_mask)]
        last = f"{float(tv.max()):g}" if tv.size else "none"
        raise InputError(
            f"split.val: the {val.n_patients} validation patients have no observation after "
            f"evaluation.condition_until={cond} (their last: {last}), so training could "
            "never validate the model; choose an earlier condition_until or another split")


def _cell(v) -> str:
    """A number as a CSV cell: repr of the float, empty when it is not finite."""
    v = float(v)
    return repr(v) if np.isfinite(v) else ""


def run_experiment(cfg: ExperimentConfig, out: str | os.PathLike | None = None,
                   stop_after: str = "predict", force_restart: bool = False) -> Path:
    """Run the experiment up to and including `stop_after` ("train": population fit and
    hybrid training; "calibrate": also the per-patient calibrations and params.csv;
    "predict": everything). Returns the run directory.

    The directory's `run.json` fingerprints the run (config sha256, data content hash,
    code version) and records its status: "running" while a stage runs, "complete" (with
    the completed stages) written last, or "failed" with the reason. Stages already
    checkpointed there are reloaded, so an interrupted run resumes and the stage
    commands can run one after another; resuming with another config, data or code is
    refused (`RunDirectoryError` saying what changed). `force_restart` deletes the run's
    own products (`RUN_PRODUCTS`) and starts over. Bad input (a forecast cut outside the
    data, training without validation data) is refused (`InputError`) before anything
    is written. Every patient's outcome is in `params.csv` and `predictions.csv`
    (STATUS); a run in which every patient failed, or a stage that diverged, writes what
    it can, records "failed" and raises `RunFailed`.
    """
    if stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {STAGES}, got {stop_after!r}")
    run_dir = Path(out or cfg.output.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirectoryError(f"--out {run_dir}: exists and is not a directory; choose "
                                "another --out")
    config_text = yaml.safe_dump(resolved(cfg), sort_keys=False)
    fingerprint = {"config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
                   "data": _data_fingerprint(cfg), "code": code_version()}
    holds_run = (run_dir / "run.json").exists() or (run_dir / "checkpoints").exists()
    previous = None
    if holds_run and not force_restart:
        previous = _check_resume(run_dir, config_text, fingerprint)
    _setup_device(cfg)
    from hybrid_twin.models import get_model

    wall = {}
    t = time.perf_counter()
    mechanistic = get_model(cfg.model.name)
    model = build_model(cfg, mechanistic)
    truth_model = (get_model(cfg.data.virtual.model)
                   if cfg.data.source == "virtual" and cfg.data.virtual.model else mechanistic)
    data_notes: dict = {}
    cohort, _ = build_cohort(cfg, mechanistic, run_dir=run_dir, notes=data_notes,
                             truth=truth_model)
    parts = cohort.split({"train": cfg.split.train, "val": cfg.split.val,
                          "test": cfg.split.test}, seed=cfg.split.seed)
    _check_inputs(cfg, cohort, parts)
    wall["data_s"] = time.perf_counter() - t

    if holds_run and force_restart:
        _remove_products(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "checkpoints"
    orphans = [p for d in (run_dir, ckpt, ckpt / "training") for p in remove_orphans(d)]
    ckpt.mkdir(exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", config_text)
    record = RunRecord(run_dir, fingerprint, previous)
    record.running()
    log = Log(run_dir / "log.jsonl")
    log("start", stage=stop_after, resumed=previous is not None,
        force_restart=bool(force_restart and holds_run),
        removed_orphans=[str(p.relative_to(run_dir)) for p in orphans])
    log("data", patients=cohort.n_patients, **{k: v.n_patients for k, v in parts.items()},
        imported=data_notes)
    try:
        return _run_stages(cfg, run_dir, log, record, stop_after, model, parts, wall)
    except RunFailed as e:
        stage = getattr(e, "stage", stop_after)
        record.failed(stage, str(e))
        log("failed", stage=stage, reason=str(e))
        raise


def _run_stages(cfg: ExperimentConfig, run_dir: Path, log: Log, record: RunRecord,
                stop_after: str, model, parts: dict, wall: dict) -> Path:
    """The stages of `run_experiment` after the data: population, training, calibration
    and forecasts per split, then params.csv, predictions.csv, plots and metrics.json."""
    import jax

    from hybrid_twin.calibrate import (
        ErrorModel,
        FitFailed,
        fit_status,
        out_of_bounds,
        predict_with_intervals,
        status_counts,
    )
    from hybrid_twin.population import fit_population
    from hybrid_twin.simulate import status_label

    ckpt = run_dir / "checkpoints"
    free = tuple(cfg.model.free) if cfg.model.free else None
    em = cfg.error_model
    options = solver_options(cfg)
    typical, omega = model.typical_params(), model.omegas()
    if free is None:
        free = tuple(q.name for q, o in zip(model.parameters, omega) if o > 0)
    t = time.perf_counter()
    pop_file = ckpt / "population.json"
    population = {"fit": False, "failure": None}
    if pop_file.exists():
        try:
            pop = json.loads(pop_file.read_text())
            typical, omega = np.array(pop["typical"], float), np.array(pop["omega"], float)
            em = ErrorModel(em.kind, pop["error_sd"][0], pop["error_sd"][1], em.estimate)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise RunDirectoryError(f"{pop_file}: unreadable population checkpoint "
                                    f"({type(e).__name__}: {e}); start over with "
                                    "--force-restart") from None
        last = (pop.get("history") or [{}])[-1]
        population.update(fit=True, converged=last.get("converged"),
                          patients=last.get("patients"), failed=last.get("failed"))
        log("population", resumed=True)
    elif cfg.population.fit and parts["train"].n_patients:
        try:
            typical, omega, res_train, history = fit_population(
                _untrained_equivalent(model), parts["train"], free=free, error_model=em,
                n_rounds=cfg.population.max_rounds, options=options)
        except FitFailed as e:
            if e.diverged:
                raise
            # every training patient failed: the run goes on with the declared
            # population, so that every patient's outcome reaches the outputs, and fails
            population["failure"] = str(e)
            log("population", failed=str(e))
        else:
            em = res_train.error_model
            last = history[-1]
            population.update(fit=True, converged=last["converged"],
                              patients=last["patients"], failed=last["failed"])
            atomic_write_text(pop_file, strict_json({
                "typical": typical.tolist(), "omega": omega.tolist(),
                "error_sd": [em.additive, em.proportional], "history": history}))
            log("population", rounds=len(history),
                typical=dict(zip(free, [float(typical[model.index('param', f)])
                                        for f in free])),
                error_sd=[em.additive, em.proportional],
                converged=f"{last['converged']}/{last['patients']}")
    population["out_of_bounds"] = out_of_bounds(model, typical)[0] if population["fit"] else []
    wall["population_s"] = time.perf_counter() - t

    history = None
    if cfg.model.learned:
        from hybrid_twin.population import train_population

        t = time.perf_counter()
        val = parts["val"]

        def on_epoch(epoch, rec):
            eta = rec["seconds"] * (cfg.training.epochs - epoch)
            log("epoch", of=cfg.training.epochs, eta_s=round(eta, 1),
                **{k: v for k, v in rec.items()})

        model, _, history = train_population(
            model, parts["train"], val, free=free, error_model=em,
            typical=typical if population["fit"] else None,
            omega=omega if population["fit"] else None,
            epochs=cfg.training.epochs, batch_size=cfg.training.batch_size,
            learning_rate=cfg.training.learning_rate, penalty_weight=cfg.training.penalty_weight,
            patience=cfg.training.patience, val_condition_until=cfg.evaluation.condition_until,
            condition_until=training_condition_until(cfg), refit_iter=cfg.training.refit_iter,
            lr_decay=cfg.training.lr_decay, lr_patience=cfg.training.lr_patience,
            min_delta=cfg.training.min_delta, seed=cfg.seed, checkpoint_dir=ckpt / "training", options=options,
            on_epoch_end=on_epoch)
        wall["training_s"] = time.perf_counter() - t
        import equinox as eqx

        with atomic_open(run_dir / "model.eqx", "wb") as fh:
            eqx.tree_serialise_leaves(fh, model)
        if cfg.output.plots and history:
            from training.plots import write_training_curves

            write_training_curves(run_dir, history)
    if stop_after == "train":
        if population["failure"]:
            raise FitFailed(population["failure"], stage="population", diverged=False)
        log("done", stage="train", run_dir=str(run_dir.resolve()))
        record.complete("train")
        return run_dir

    cond = cfg.evaluation.condition_until
    rows, prow, metrics = [], [], {}
    fixed_em = ErrorModel(em.kind, em.additive, em.proportional, estimate=False)
    plot_data = {}
    outcomes = {}  # per split: _outcome of the calibrations, then of the forecasts
    every = []  # each patient's final status
    t = time.perf_counter()
    for split in cfg.evaluation.splits:
        c = parts[split]
        if c.n_patients == 0:
            continue
        res = _calibrate_split(ckpt / f"calibration_{split}.eqx", log, split, model, c,
                               free=free, typical=typical, omega=omega, error_model=fixed_em,
                               condition_until=cond, max_iter=cfg.calibration.max_iter,
                               n_starts=cfg.calibration.n_starts, seed=cfg.seed,
                               options=options)
        fit = fit_status(res)
        p_est, se = np.asarray(res.params), np.asarray(res.se)
        oob = out_of_bounds(model, p_est)
        conv = np.asarray(res.converged)
        for i, pid in enumerate(c.ids):
            failed = fit[i].startswith("solver_failure")
            prow.append([pid, split,
                         *["" if failed else _cell(v) for v in p_est[i]],
                         *["" if failed else _cell(v) for v in se[i]], bool(conv[i]), fit[i],
                         "" if failed else ";".join(oob[i])])
        oob_counts = collections.Counter(n for o, f in zip(oob, fit)
                                         if not f.startswith("solver_failure") for n in o)
        outcomes[split] = _outcome(fit, conv, oob_counts)
        if stop_after == "calibrate":
            every += fit
            continue
        pred, lo, hi, solved = predict_with_intervals(
            model, res, c.schedule, c.obs_times, c.obs_mask, c.obs_index, options=options,
            return_status=True)
        pred, lo, hi, solved = (np.asarray(a) for a in (pred, lo, hi, solved))
        status = [f if f.startswith("solver_failure") or s == 0 else status_label(s)
                  for f, s in zip(fit, solved)]
        failed = np.array([s.startswith("solver_failure") for s in status], bool)
        outcomes[split] = _outcome(status, conv, oob_counts)
        every += status
        usable = ~failed[:, None]
        pred, lo, hi = (np.where(usable, a, np.nan) for a in (pred, lo, hi))
        data_mask = np.asarray(c.data_mask)
        eval_mask = np.asarray(c.score_mask(cond)) & usable
        metrics[split] = _metrics(model, c, pred, lo, hi, eval_mask, cfg.evaluation.metrics)
        if cfg.evaluation.horizons:
            t_rel = np.asarray(c.obs_times) - cond
            metrics[split]["horizons"] = {
                f"{h:g}": _metrics(model, c, pred, lo, hi, eval_mask & (t_rel <= h),
                                   cfg.evaluation.metrics)
                for h in cfg.evaluation.horizons}
        metrics[split].update(outcomes[split])
        log("evaluate", split=split, patients=c.n_patients, failed=int(failed.sum()),
            status=status_counts(status), rmse=metrics[split]["rmse"])
        t_obs, y = np.asarray(c.obs_times), np.asarray(c.obs_values)
        k, om = np.asarray(c.obs_index), np.asarray(c.obs_mask)
        for i, pid in enumerate(c.ids):
            for j in np.flatnonzero(om[i]):
                dv = "" if not data_mask[i, j] else repr(float(y[i, j]))
                rows.append([pid, repr(float(t_obs[i, j])), model.observable_names[k[i, j]], dv,
                             _cell(pred[i, j]), _cell(lo[i, j]), _cell(hi[i, j]), split,
                             status[i]])
        plot_data[split] = (c, pred, lo, hi)
    wall["calibration_and_prediction_s"] = time.perf_counter() - t

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["ID", "SPLIT", *model.param_names, *[f"SE_{n}" for n in model.param_names],
                "CONVERGED", "STATUS", "OUT_OF_BOUNDS"])
    w.writerows(prow)
    atomic_write_text(run_dir / "params.csv", buf.getvalue())
    n_failed = sum(s.startswith("solver_failure") for s in every)
    if stop_after == "calibrate":
        print("\n".join(_outcome_lines(outcomes, population)))
        _finish_or_fail(population, every, n_failed)
        log("done", stage="calibrate", run_dir=str(run_dir.resolve()))
        record.complete("calibrate")
        return run_dir
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["ID", "TIME", "OBS", "DV", "PRED", "PRED_LO", "PRED_HI", "SPLIT", "STATUS"])
    w.writerows(rows)
    atomic_write_text(run_dir / "predictions.csv", buf.getvalue())

    usable_splits = {s: d for s, d in plot_data.items()
                     if metrics[s]["n_failed"] < metrics[s]["n_patients"]}
    if cfg.output.plots and usable_splits:
        t = time.perf_counter()
        from training.plots import write_plots, write_vpc

        write_plots(run_dir, model, usable_splits, cond, cfg.evaluation.plot_patients)
        vpc_split = "test" if "test" in usable_splits else next(iter(usable_splits))
        write_vpc(run_dir, model, usable_splits[vpc_split][0], typical, omega, em, free,
                  seed=cfg.seed, options=options)
        wall["plots_s"] = time.perf_counter() - t
    elif cfg.output.plots:
        log("plots", skipped="every patient failed")
    import diffrax
    import equinox

    metrics["run"] = {
        "name": cfg.name, "seed": cfg.seed, "device": str(jax.devices()[0]),
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "diffrax": diffrax.__version__, "equinox": equinox.__version__,
                     "hybrid_twin": record.data["code"]},
        "config_sha256": record.data["config_sha256"], "data": record.data["data"],
        "wall_s": {k: round(v, 3) for k, v in wall.items()},
        "free": list(free), "error_model": [em.kind, em.additive, em.proportional],
        "condition_until": cond,
        "population": population,
        "patients": {"n": len(every), "n_failed": n_failed,
                     "status": dict(collections.Counter(every))},
    }
    atomic_write_text(run_dir / "metrics.json", strict_json(metrics))
    print(summary_table(metrics, model.observable_names))
    _finish_or_fail(population, every, n_failed)
    log("done", run_dir=str(run_dir.resolve()))
    record.complete("predict")
    return run_dir


def _untrained_equivalent(model):
    """The model the population stage fits: an untrained hybrid whose learned terms add
    exactly nothing yet (zero-initialised corrections and "scale"/"add" closures, no
    covariate network, with the mechanism on) is fitted switched off, which gives the
    same estimates without evaluating its networks (a 5-32-32-1 correction made the
    3-day T1D population fit ten times slower); any other model as it is."""
    from hybrid_twin.hybrid import HybridModel

    if not isinstance(model, HybridModel) or not model.use_mechanism:
        return model
    if model.covariate_net is not None or any(c.mode == "replace" for c in model.closures):
        return model
    nets = [t.net for t in (*model.corrections, *model.closures)]
    if all(not np.any(np.asarray(n.mlp.layers[-1].weight)) and
           not np.any(np.asarray(n.mlp.layers[-1].bias)) for n in nets):
        return model.switched_off()
    return model


def _finish_or_fail(population: dict, every: list[str], n_failed: int) -> None:
    """`RunFailed` when the population stage had no usable patient or every patient
    failed (the outputs are written by then)."""
    from hybrid_twin.calibrate import status_counts

    reasons = []
    if population.get("failure"):
        reasons.append(population["failure"] + "; the declared population values were used")
    if every and n_failed == len(every):
        reasons.append(f"every one of the {len(every)} patients failed "
                       f"({status_counts(every)})")
    if reasons:
        raise RunFailed("; ".join(reasons) + " (see STATUS in predictions.csv and params.csv)")


def _outcome(status: list[str], converged, out_of_bounds: dict) -> dict:
    """A split's patients in numbers: n_patients, n_failed (solver failures), the count of
    each status, the converged fraction, and per parameter the patients whose estimate
    lies outside its declared bounds."""
    return {"n_patients": len(status),
            "n_failed": sum(s.startswith("solver_failure") for s in status),
            "status": dict(collections.Counter(status)),
            "converged_fraction": float(np.mean(converged)) if len(status) else None,
            "out_of_bounds": dict(out_of_bounds)}


def _outcome_lines(outcomes: dict, population: dict) -> list[str]:
    """The patients' outcomes, per stage: the population fit's converged patients (or its
    failure, and typical values outside their bounds), then per split (`_outcome`s) the
    failures and why, the converged fraction, and estimates outside their bounds."""
    lines = []
    if population.get("fit") and population.get("patients"):
        lines.append(f"population: {population.get('converged')}/{population['patients']} "
                     "converged in the last round")
    if population.get("failure"):
        lines.append(f"population: FAILED: {population['failure']}")
    if population.get("out_of_bounds"):
        lines.append("population: typical value(s) outside their declared bounds: "
                     + ", ".join(population["out_of_bounds"]))
    for split, o in outcomes.items():
        status = o.get("status") or {}
        line = f"{split}: {o['n_patients']} patients, {o['n_failed']} failed"
        failures = {k: v for k, v in status.items() if k.startswith("solver_failure")}
        if failures:
            line += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(failures.items())) + ")"
        if o.get("converged_fraction") is not None:
            line += f", converged fraction {o['converged_fraction']:.2f}"
        other = {k: v for k, v in status.items() if k in ("not_converged", "no_data")}
        if other:
            line += ", " + ", ".join(f"{v} {k}" for k, v in sorted(other.items()))
        if o.get("out_of_bounds"):
            line += "; estimates outside their declared bounds: " + ", ".join(
                f"{k} ({v} patients)" for k, v in sorted(o["out_of_bounds"].items()))
        lines.append(line)
    return lines


def summary_table(metrics: dict, observables) -> str:
    """One-screen summary: metrics per split and observable, the patients' outcomes
    (population and per split: failures and why, converged fractions, estimates outside
    their bounds), wall times, device."""
    lines = [f"{'split':<8}{'observable':<16}{'RMSE':>12}{'MAE':>12}{'n':>8}"]
    for split, m in metrics.items():
        if split == "run":
            continue
        for obs in observables:
            if obs in m["rmse"]:
                lines.append(f"{split:<8}{obs:<16}{m['rmse'][obs]:>12.4g}"
                             f"{m['mae'][obs]:>12.4g}{m['n'][obs]:>8}")
    run = metrics.get("run", {})
    lines += _outcome_lines({s: m for s, m in metrics.items()
                             if s != "run" and "n_patients" in m},
                            run.get("population") or {})
    lines.append("wall: " + ", ".join(f"{k} {v:.1f}" for k, v in run.get("wall_s", {}).items())
                 + f" | device {run.get('device', '?')}")
    return "\n".join(lines)
