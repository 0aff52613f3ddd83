"""Hybrid value on structurally different truths: cohorts simulated by a model outside the
fitted model's family (with noise and effects the mechanism lacks), forecast by the
mechanism alone, by the hybrid (the case's config), by a neural ODE and by a constant.

Each case is a shipped config whose virtual cohort comes from another model
(`data.virtual.model`). For every seed (data, split and network initialisation) each
variant is a full `hybrid-twin run`: population fit, training (hybrid, neural ODE),
calibration of every held-out patient on its data up to `evaluation.condition_until` and
a forecast of the rest. Variants:

- `mechanistic`: no learned term, the same calibration;
- `hybrid`: the config's learned terms, with the training defaults (validation plateau);
- `neural_ode`: no mechanism; dy/dt of every state from the states, the inputs, the
  patient's free parameters (a per-patient latent code, calibrated like the mechanism's)
  and the time of day, with the same training settings; the doses reach it through the
  mechanism's absorption states (`input_states`: carbohydrate and insulin on board, as
  a glucose forecaster is given them; the oral depot in PK); a small built-in search
  over width and learning rate picks the candidate with the best validation forecast;
- `constant`: each patient's mean observation up to the cut, held.

The hybrid gets the same learning-rate search. Scores: forecast RMSE on the test patients
after the cut, against the noise-free truth (and against the noisy data), per seed, with
the mean and a 95% t-interval over seeds. Plots of each learned term against its inputs
(one input varied over its training range, the others at their mean) are written to the
work directory.

    python -m benchmarks.hybrid_value_structural --case pk_enterohepatic \
        --seeds 0 1 2 --out benchmarks/results/hybrid_value_structural-cpu.jsonl
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.common import device_info, emit
from hybrid_twin.config import load_config


@dataclasses.dataclass(frozen=True)
class Case:
    """A benchmark cohort: its config, the observable scored, and the neural ODE's input
    states (moved by the mechanism: the absorption of doses)."""

    config: str
    observable: str
    description: str
    node_input_states: str | tuple[str, ...] = "doses"
    node_states: tuple[str, ...] = ()
    """The states the neural ODE drives (empty: every non-input state)."""
    node_latent: int = 0
    """Latent states of the neural ODE (driven by it, and features)."""


CASES = {
    "pk_enterohepatic": Case(
        "configs/pk_enterohepatic_hybrid.yaml", "concentration",
        "pkpd.EnterohepaticMM truth (Michaelis-Menten elimination, gallbladder "
        "recirculation at meals) fitted by pkpd.OneCompartment + learned terms",
        ("depot",)),
    "t1d_bergman": Case(
        "configs/t1d_bergman_hybrid.yaml", "glucose",
        "glucose.HovorkaT1D truth (CGM, basal infusion, meals and boluses) fitted by "
        "glucose.BergmanMinimal + learned terms", node_states=("G",), node_latent=2),
    "t1d_hovorka_dawn": Case(
        "configs/t1d_hybrid.yaml", "glucose",
        "glucose.HovorkaT1DDawn truth (dawn phenomenon) fitted by glucose.HovorkaT1D + "
        "learned terms", node_states=("C",), node_latent=2),
}
NODE_WIDTHS = (32, 64)
LEARNING_RATES = (3e-3, 1e-2)


def run_variant(config: str, out: Path, overrides: list[str]) -> Path:
    """One experiment run (no plots); returns its run directory."""
    from training.run import run_experiment

    cfg = load_config(config, [*overrides, "output.plots=false"])
    return Path(run_experiment(cfg, out))


def case_cohort(config: str, overrides: list[str]):
    """(config, cohort, VirtualCohort) of a case: the virtual cohort simulated by its truth
    and expressed in the fitted model's observables, as a run builds it."""
    from hybrid_twin.config import solver_options
    from hybrid_twin.data.load import load_cohort
    from hybrid_twin.models import get_model

    cfg = load_config(config, overrides)
    model = get_model(cfg.model.name)
    truth = get_model(cfg.data.virtual.model) if cfg.data.virtual.model else model
    cohort, vc, _ = load_cohort(cfg.data, model, options=solver_options(cfg), truth=truth)
    return cfg, cohort, vc


def truth_table(cohort, vc) -> dict[tuple[str, float, str], float]:
    """The noise-free truth of a case's virtual cohort, keyed by (ID, TIME, OBS)."""
    t = np.asarray(cohort.obs_times)
    k = np.asarray(cohort.obs_index)
    mask = np.asarray(cohort.obs_mask)
    table = {}
    for i, pid in enumerate(cohort.ids):
        for j in np.flatnonzero(mask[i]):
            table[pid, round(float(t[i, j]), 6), cohort.observable_names[k[i, j]]] = float(
                vc.true_predictions[i, j])
    return table


def forecast_scores(run_dir: Path, truth: dict, observable: str, cut: float,
                    split: str) -> dict[str, float]:
    """RMSE of a run's forecasts after `cut` for `split`, against the truth and the data."""
    err_t, err_d = [], []
    with open(run_dir / "predictions.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            if r["SPLIT"] != split or r["OBS"] != observable or float(r["TIME"]) <= cut:
                continue
            if not r["PRED"]:
                continue
            pred = float(r["PRED"])
            err_t.append(pred - truth[r["ID"], round(float(r["TIME"]), 6), r["OBS"]])
            err_d.append(pred - float(r["DV"]))
    return {"rmse_truth": float(np.sqrt(np.mean(np.square(err_t)))),
            "rmse_data": float(np.sqrt(np.mean(np.square(err_d)))), "n": len(err_t)}


def constant_scores(cfg, cohort, truth: dict, observable: str, cut: float,
                    split: str) -> dict[str, float]:
    """The constant forecast: each patient of `split` (of `cohort`, split as `cfg` says)
    holds its mean observation up to `cut`."""
    parts = cohort.split({"train": cfg.split.train, "val": cfg.split.val,
                          "test": cfg.split.test}, seed=cfg.split.seed)
    c = parts[split]
    t, y = np.asarray(c.obs_times), np.asarray(c.obs_values)
    k, mask = np.asarray(c.obs_index), np.asarray(c.data_mask)
    ko = c.observable_names.index(observable)
    err_t, err_d = [], []
    for i, pid in enumerate(c.ids):
        sel = mask[i] & (k[i] == ko)
        early, late = sel & (t[i] <= cut), sel & (t[i] > cut)
        if not early.any() or not late.any():
            continue
        level = y[i, early].mean()
        err_d += list(level - y[i, late])
        err_t += [level - truth[pid, round(float(tt), 6), observable] for tt in t[i, late]]
    return {"rmse_truth": float(np.sqrt(np.mean(np.square(err_t)))),
            "rmse_data": float(np.sqrt(np.mean(np.square(err_d)))), "n": len(err_t)}


def val_rmse(run_dir: Path, observable: str) -> float:
    m = json.loads((run_dir / "metrics.json").read_text())
    return float(m["val"]["rmse"][observable])


def node_learned(case: Case, width: int) -> list[str]:
    """The neural ODE of a case (config overrides): from the states it drives, the
    absorption states, the inputs, free parameters and time of day."""
    from hybrid_twin.hybrid import input_states_of, latent_names
    from hybrid_twin.models import get_model

    cfg = load_config(case.config)
    model = get_model(cfg.model.name)
    free = cfg.model.free or [q.name for q in model.parameters if q.omega > 0]
    driven = [*case.node_states, *latent_names(case.node_latent)] if case.node_states else []
    inputs = input_states_of(model, case.node_input_states)
    states = ([*driven, *(s for s in inputs if s not in driven)] if driven
              else [*model.state_names, *latent_names(case.node_latent)])
    feats = [*states, *model.input_names, *free, "sin_day", "cos_day"]
    spec = (f"kind: neural_ode, features: [{', '.join(feats)}], width: {width}, depth: 2, "
            f"input_states: [{', '.join(inputs)}]")
    if driven:
        spec += f", states: [{', '.join(driven)}]"
    return [f"model.learned=[{{{spec}}}]", f"model.latent_states={case.node_latent}"]


def search(config: str, work: Path, base: list[str], candidates: dict[str, list[str]],
           observable: str) -> tuple[str, Path, dict]:
    """Run every candidate; return the one with the lowest validation forecast RMSE."""
    tried = {}
    for name, extra in candidates.items():
        run_dir = run_variant(config, work / name, [*base, *extra])
        tried[name] = (val_rmse(run_dir, observable), run_dir)
    best = min(tried, key=lambda n: tried[n][0])
    return best, tried[best][1], {n: v for n, (v, _) in tried.items()}


def plot_learned_terms(run_dir: Path, out_png: Path) -> None:
    """Each learned term's output against each of its inputs (the others at their mean,
    one input swept over mean +- 2 SD of its training data, from the term's scales)."""
    import jax.numpy as jnp
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.run import load_trained_model

    model = load_trained_model(run_dir)
    terms = [(f"closure {c.term} ({c.mode})", c) for c in model.closures] + [
        (f"correction d{'/'.join(c.states)}/dt", c) for c in model.corrections]
    if not terms:
        return
    n_panels = sum(len(c.features) for _, c in terms)
    fig, axes = plt.subplots(1, n_panels, figsize=(3.2 * n_panels, 2.8), squeeze=False)
    ax_i = 0
    for label, term in terms:
        net = term.net
        shift, scale = np.asarray(net.in_shift), np.asarray(net.in_scale)
        for f, feat in enumerate(term.features):
            grid = shift[f] + scale[f] * np.linspace(-2, 2, 81)
            x = np.tile(shift, (grid.size, 1))
            x[:, f] = grid
            g = np.asarray(net(jnp.asarray(x)))
            ax = axes[0, ax_i]
            ax.plot(grid, g[:, 0])
            ax.set_xlabel(feat)
            ax.set_title(label, fontsize=8)
            ax_i += 1
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def interval(values: list[float]) -> dict[str, float]:
    """Mean and 95% t-interval half-width over seeds."""
    from scipy import stats

    v = np.asarray(values, float)
    half = (float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
            if v.size > 1 else float("nan"))
    return {"mean": float(v.mean()), "ci95": half, "values": v.tolist()}


def run_case(name: str, seeds: list[int], work: Path, extra: list[str],
             node_widths=NODE_WIDTHS, learning_rates=LEARNING_RATES) -> dict:
    case = CASES[name]
    cfg = load_config(case.config, extra)
    cut = float(cfg.evaluation.condition_until)
    per_seed = []
    for seed in seeds:
        base = [*extra, f"seed={seed}", f"data.virtual.seed={seed}", f"split.seed={seed}"]
        wd = work / name / f"seed{seed}"
        cfg_s, cohort, vc = case_cohort(case.config, base)
        truth = truth_table(cohort, vc)
        t0 = time.perf_counter()
        print(f"== {name} seed {seed}: mechanistic", flush=True)
        mech_dir = run_variant(case.config, wd / "mechanistic", [*base, "model.learned=[]"])
        print(f"== {name} seed {seed}: hybrid (learning-rate search)", flush=True)
        h_name, h_dir, h_val = search(case.config, wd / "hybrid", base, {
            f"lr{lr:g}": [f"training.learning_rate={lr}"] for lr in learning_rates},
            case.observable)
        print(f"== {name} seed {seed}: neural ODE (width and learning-rate search)",
              flush=True)
        n_name, n_dir, n_val = search(case.config, wd / "neural_ode", base, {
            f"w{w}_lr{lr:g}": [*node_learned(case, w), f"training.learning_rate={lr}"]
            for w in node_widths for lr in learning_rates}, case.observable)
        plot_learned_terms(h_dir, wd / "hybrid_learned_terms.png")
        rec = {
            "seed": seed,
            "mechanistic": forecast_scores(mech_dir, truth, case.observable, cut, "test"),
            "hybrid": {**forecast_scores(h_dir, truth, case.observable, cut, "test"),
                       "chosen": h_name, "val_rmse": h_val},
            "neural_ode": {**forecast_scores(n_dir, truth, case.observable, cut, "test"),
                           "chosen": n_name, "val_rmse": n_val},
            "constant": constant_scores(cfg_s, cohort, truth, case.observable, cut, "test"),
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        print(json.dumps(rec), flush=True)
        per_seed.append(rec)
    summary = {v: interval([r[v]["rmse_truth"] for r in per_seed])
               for v in ("mechanistic", "hybrid", "neural_ode", "constant")}

    def ratios(a, b):
        return interval([r[a]["rmse_truth"] / r[b]["rmse_truth"] for r in per_seed])

    return {
        "case": name, "description": case.description, "config": case.config,
        "overrides": extra, "condition_until": cut, "observable": case.observable,
        "seeds": seeds, "node_widths": list(node_widths),
        "learning_rates": list(learning_rates), "test_rmse_truth": summary,
        "hybrid_vs_mechanistic": ratios("hybrid", "mechanistic"),
        "hybrid_vs_neural_ode": ratios("hybrid", "neural_ode"),
        "neural_ode_vs_constant": ratios("neural_ode", "constant"),
        "per_seed": per_seed,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=sorted(CASES), action="append", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run (e.g. data.virtual.n=40)")
    ap.add_argument("--node-widths", type=int, nargs="+", default=list(NODE_WIDTHS),
                    help="neural ODE widths searched")
    ap.add_argument("--learning-rates", type=float, nargs="+", default=list(LEARNING_RATES),
                    help="learning rates searched (hybrid and neural ODE)")
    ap.add_argument("--workdir", default="runs/hybrid_value_structural")
    ap.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    for name in args.case:
        if (work / name).exists():
            shutil.rmtree(work / name)
        record = run_case(name, args.seeds, work, args.set, args.node_widths,
                          args.learning_rates)
        emit({"benchmark": "hybrid_value_structural", **device_info(), **record}, args.out)


if __name__ == "__main__":
    main()
