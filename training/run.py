"""`hybrid-twin run CONFIG`: data -> split -> population -> calibration -> forecast ->
metrics, predictions, parameters and plots in a run directory (DESIGN.md contract)."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import yaml

from hybrid_twin._atomic import atomic_open, atomic_write_text
from hybrid_twin.config import ExperimentConfig, resolved, solver_options


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
            return neural_ode(mechanistic, key=key, width=lt.width, depth=lt.depth,
                              features=lt.features or None, feature_scales=scales,
                              out_scale=lt.out_scale, day_length=day)
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
                       day_length=day)


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
        raise FileNotFoundError(f"{path}: no trained model (has the run finished training?)")
    with open(path, "rb") as fh:
        return eqx.tree_deserialise_leaves(fh, skeleton)


def build_cohort(cfg: ExperimentConfig, model):
    """The configured data as a Cohort (a virtual one simulated with the configured
    solver)."""
    from hybrid_twin.data import read_cohort_h5, read_event_table
    from hybrid_twin.data.virtual import ScheduleSpec, virtual_cohort

    if cfg.data.source == "csv":
        return read_event_table(cfg.data.path, model), None
    if cfg.data.source == "hdf5":
        return read_cohort_h5(cfg.data.path), None
    v = cfg.data.virtual
    spec = ScheduleSpec(doses=tuple(v.doses), obs_every=v.obs_every, obs_start=v.obs_start,
                        horizon=v.horizon,
                        observables=tuple(v.observables) if v.observables else None)
    vc = virtual_cohort(model, v.n, schedule=spec, noise=v.noise, seed=v.seed,
                        options=solver_options(cfg))
    return vc.cohort, vc


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
            corr=zeros((n, f, f)), cost=zeros((n,)), converged=zeros((n,), bool), n_iter=0,
            free=tuple(kw["free"]), error_model=kw["error_model"])
        with open(path, "rb") as fh:
            res = eqx.tree_deserialise_leaves(fh, skeleton)
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


def run_experiment(cfg: ExperimentConfig, out: str | os.PathLike | None = None,
                   stop_after: str = "predict") -> Path:
    """Run the experiment up to and including `stop_after` ("train": population fit and
    hybrid training; "calibrate": also the per-patient calibrations and params.csv;
    "predict": everything). Stages already checkpointed in the run directory are reloaded,
    so the stage commands can be run one after another. Returns the run directory."""
    if stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {STAGES}, got {stop_after!r}")
    _setup_device(cfg)
    import jax

    from hybrid_twin.calibrate import ErrorModel, predict_with_intervals
    from hybrid_twin.models import get_model
    from hybrid_twin.population import fit_population

    run_dir = Path(out or cfg.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "checkpoints"
    ckpt.mkdir(exist_ok=True)
    config_text = yaml.safe_dump(resolved(cfg), sort_keys=False)
    if (run_dir / "config.yaml").exists() and (run_dir / "config.yaml").read_text() != config_text:
        raise ValueError(f"{run_dir} holds a run of a different config; resume it with the "
                         "same config or choose another --out")
    log = Log(run_dir / "log.jsonl")
    atomic_write_text(run_dir / "config.yaml", config_text)
    wall = {}
    t = time.perf_counter()
    mechanistic = get_model(cfg.model.name)
    model = build_model(cfg, mechanistic)
    truth_model = (get_model(cfg.data.virtual.model)
                   if cfg.data.source == "virtual" and cfg.data.virtual.model else mechanistic)
    cohort, _ = build_cohort(cfg, truth_model)
    parts = cohort.split({"train": cfg.split.train, "val": cfg.split.val,
                          "test": cfg.split.test}, seed=cfg.split.seed)
    wall["data_s"] = time.perf_counter() - t
    log("data", patients=cohort.n_patients, **{k: v.n_patients for k, v in parts.items()})

    free = tuple(cfg.model.free) if cfg.model.free else None
    em = cfg.error_model
    options = solver_options(cfg)
    typical, omega = model.typical_params(), model.omegas()
    if free is None:
        free = tuple(q.name for q, o in zip(model.parameters, omega) if o > 0)
    t = time.perf_counter()
    pop_file = ckpt / "population.json"
    if pop_file.exists():
        pop = json.loads(pop_file.read_text())
        typical, omega = np.array(pop["typical"]), np.array(pop["omega"])
        em = ErrorModel(em.kind, pop["error_sd"][0], pop["error_sd"][1], em.estimate)
        log("population", resumed=True)
    elif cfg.population.fit and parts["train"].n_patients:
        typical, omega, res_train, history = fit_population(
            model, parts["train"], free=free, error_model=em, n_rounds=cfg.population.max_rounds,
            options=options)
        em = res_train.error_model
        atomic_write_text(pop_file, json.dumps({"typical": typical.tolist(), "omega": omega.tolist(),
                                           "error_sd": [em.additive, em.proportional],
                                           "history": history}))
        log("population", rounds=len(history),
            typical=dict(zip(free, [float(typical[model.index('param', f)]) for f in free])),
            error_sd=[em.additive, em.proportional])
    wall["population_s"] = time.perf_counter() - t

    history = None
    if cfg.model.learned:
        from hybrid_twin.population import train_population

        t = time.perf_counter()
        val = parts["val"] if parts["val"].n_patients else None

        def on_epoch(epoch, rec):
            eta = rec["seconds"] * (cfg.training.epochs - epoch)
            log("epoch", of=cfg.training.epochs, eta_s=round(eta, 1),
                **{k: v for k, v in rec.items()})

        model, _, history = train_population(
            model, parts["train"], val, free=free, error_model=em,
            epochs=cfg.training.epochs, batch_size=cfg.training.batch_size,
            learning_rate=cfg.training.learning_rate, penalty_weight=cfg.training.penalty_weight,
            patience=cfg.training.patience, val_condition_until=cfg.evaluation.condition_until,
            seed=cfg.seed, checkpoint_dir=ckpt / "training", options=options,
            on_epoch_end=on_epoch)
        wall["training_s"] = time.perf_counter() - t
        import equinox as eqx

        with atomic_open(run_dir / "model.eqx", "wb") as fh:
            eqx.tree_serialise_leaves(fh, model)
        if cfg.output.plots and history:
            from training.plots import write_training_curves

            write_training_curves(run_dir, history)
    if stop_after == "train":
        log("done", stage="train", run_dir=str(run_dir.resolve()))
        return run_dir

    cond = cfg.evaluation.condition_until
    rows, prow, metrics = [], [], {}
    fixed_em = ErrorModel(em.kind, em.additive, em.proportional, estimate=False)
    plot_data = {}
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
        p_est, se = np.asarray(res.params), np.asarray(res.se)
        for i, pid in enumerate(c.ids):
            prow.append([pid, split, *[repr(float(v)) for v in p_est[i]],
                         *[repr(float(v)) for v in se[i]], bool(np.asarray(res.converged)[i])])
        if stop_after == "calibrate":
            continue
        pred, lo, hi = predict_with_intervals(model, res, c.schedule, c.obs_times, c.obs_mask,
                                              c.obs_index, options=options)
        pred, lo, hi = (np.asarray(a) for a in (pred, lo, hi))
        data_mask = np.asarray(c.data_mask)
        eval_mask = np.asarray(c.score_mask(cond))
        metrics[split] = _metrics(model, c, pred, lo, hi, eval_mask, cfg.evaluation.metrics)
        if cfg.evaluation.horizons:
            t_rel = np.asarray(c.obs_times) - cond
            metrics[split]["horizons"] = {
                f"{h:g}": _metrics(model, c, pred, lo, hi, eval_mask & (t_rel <= h),
                                   cfg.evaluation.metrics)
                for h in cfg.evaluation.horizons}
        metrics[split]["converged_fraction"] = float(np.mean(np.asarray(res.converged)))
        log("evaluate", split=split, patients=c.n_patients, rmse=metrics[split]["rmse"])
        t_obs, y = np.asarray(c.obs_times), np.asarray(c.obs_values)
        k, om = np.asarray(c.obs_index), np.asarray(c.obs_mask)
        for i, pid in enumerate(c.ids):
            for j in np.flatnonzero(om[i]):
                dv = "" if not data_mask[i, j] else repr(float(y[i, j]))
                rows.append([pid, repr(float(t_obs[i, j])), model.observable_names[k[i, j]], dv,
                             repr(float(pred[i, j])), repr(float(lo[i, j])),
                             repr(float(hi[i, j])), split])
        plot_data[split] = (c, pred, lo, hi)
    wall["calibration_and_prediction_s"] = time.perf_counter() - t

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["ID", "SPLIT", *model.param_names, *[f"SE_{n}" for n in model.param_names],
                "CONVERGED"])
    w.writerows(prow)
    atomic_write_text(run_dir / "params.csv", buf.getvalue())
    if stop_after == "calibrate":
        log("done", stage="calibrate", run_dir=str(run_dir.resolve()))
        return run_dir
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["ID", "TIME", "OBS", "DV", "PRED", "PRED_LO", "PRED_HI", "SPLIT"])
    w.writerows(rows)
    atomic_write_text(run_dir / "predictions.csv", buf.getvalue())

    if cfg.output.plots:
        t = time.perf_counter()
        from training.plots import write_plots, write_vpc

        write_plots(run_dir, model, plot_data, cond, cfg.evaluation.plot_patients)
        vpc_split = "test" if "test" in plot_data else next(iter(plot_data))
        write_vpc(run_dir, model, plot_data[vpc_split][0], typical, omega, em, free,
                  seed=cfg.seed, options=options)
        wall["plots_s"] = time.perf_counter() - t
    import diffrax
    import equinox

    metrics["run"] = {
        "name": cfg.name, "seed": cfg.seed, "device": str(jax.devices()[0]),
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "diffrax": diffrax.__version__, "equinox": equinox.__version__},
        "wall_s": {k: round(v, 3) for k, v in wall.items()},
        "free": list(free), "error_model": [em.kind, em.additive, em.proportional],
        "condition_until": cond,
    }
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    print(summary_table(metrics, model.observable_names))
    log("done", run_dir=str(run_dir.resolve()))
    return run_dir


def summary_table(metrics: dict, observables) -> str:
    """One-screen summary: metrics per split and observable, wall times, device."""
    lines = [f"{'split':<8}{'observable':<16}{'RMSE':>12}{'MAE':>12}{'n':>8}"]
    for split, m in metrics.items():
        if split == "run":
            continue
        for obs in observables:
            if obs in m["rmse"]:
                lines.append(f"{split:<8}{obs:<16}{m['rmse'][obs]:>12.4g}"
                             f"{m['mae'][obs]:>12.4g}{m['n'][obs]:>8}")
    run = metrics.get("run", {})
    lines.append("wall: " + ", ".join(f"{k} {v:.1f}" for k, v in run.get("wall_s", {}).items())
                 + f" | device {run.get('device', '?')}")
    return "\n".join(lines)
