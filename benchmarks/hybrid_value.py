"""Hybrid value: does the learned term pay for itself where the mechanism is incomplete,
and cost nothing where it is not?

Runs the experiment `configs/glucose_hybrid.yaml` (or `--config`) in variants, each a full
`hybrid-twin run` (population fit, training, per-patient calibration on the data up to
`evaluation.condition_until`, forecast of the rest):

1. circadian cohort (truth `glucose.BergmanCircadian`, insulin sensitivity on a daily
   cycle): the mechanistic model (no learned term), the hybrid model (the config's learned
   term) and a pure neural ODE (`--node-epochs` epochs, states and time of day as features);
2. cohort without the effect (truth `glucose.BergmanMinimal`): mechanistic and hybrid.

Prints one JSON line with each variant's forecast RMSE on the test and validation
patients, the ratios the acceptance criteria name, and how closely the hybrid's learned
time-of-day multiplier follows the true one (correlation over the day).

    python -m benchmarks.hybrid_value --out benchmarks/results/hybrid_value-cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.common import device_info, emit
from hybrid_twin.config import load_config

NODE = [
    "model.free=[Gb]",
    ("model.learned=[{kind: neural_ode, features: [G, X, I, Q_gut, S_sc, sin_day, cos_day], "
     "feature_scales: {G: [100.0, 50.0], X: [0.0, 0.01], I: [15.0, 20.0], Q_gut: [0.0, 50.0], "
     "S_sc: [0.0, 1.0]}, width: 32, depth: 2, out_scale: [1.0, 0.0001, 0.5, 2.0, 0.02]}]"),
]


def run_variant(config: str, out: Path, overrides: list[str]) -> dict:
    """One experiment run; returns its metrics.json and wall time."""
    from training.run import run_experiment

    cfg = load_config(config, [*overrides, "output.plots=false"])
    t0 = time.perf_counter()
    run_dir = run_experiment(cfg, out)
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    metrics["wall_s_total"] = time.perf_counter() - t0
    return metrics


def learned_multiplier(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Clock times (min) and the hybrid's learned multiplier of the closed term over a day."""
    import jax.numpy as jnp

    from hybrid_twin.hybrid import _features
    from training.run import load_trained_model

    model = load_trained_model(run_dir)
    closure = model.closures[0]
    t = np.arange(0.0, 1440.0, 10.0)
    x = _features(model.mechanistic, closure.features, jnp.asarray(t), (), {}, {},
                  model.day_length)
    g = np.asarray(closure.net(x)[..., 0])
    return t, 1.0 + g if closure.mode == "scale" else g


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/glucose_hybrid.yaml")
    ap.add_argument("--n", type=int, default=120, help="virtual patients per cohort")
    ap.add_argument("--epochs", type=int, default=30, help="hybrid training epochs")
    ap.add_argument("--node-epochs", type=int, default=150, help="neural ODE training epochs")
    ap.add_argument("--workdir", default="runs/hybrid_value", help="run directories")
    ap.add_argument("--out", default=None, help="append the JSON line to this file")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    base = [f"data.virtual.n={args.n}", f"training.epochs={args.epochs}",
            "training.patience=10"]
    plain = "data.virtual.model=glucose.BergmanMinimal"
    variants = {
        "mechanistic": ["model.learned=[]"],
        "hybrid": [],
        "neural_ode": [*NODE, f"training.epochs={args.node_epochs}", "training.patience=40",
                       "training.learning_rate=0.005"],
        "mechanistic_no_effect": ["model.learned=[]", plain],
        "hybrid_no_effect": [plain],
    }
    results = {}
    for name, extra in variants.items():
        print(f"== {name}", flush=True)
        m = run_variant(args.config, work / name, [*base, *extra])
        results[name] = {
            "test_rmse": m["test"]["rmse"]["glucose"], "val_rmse": m["val"]["rmse"]["glucose"],
            "test_coverage": m["test"].get("coverage", {}).get("glucose"),
            "wall_s": round(m["wall_s_total"], 1),
        }
    t, mult = learned_multiplier(work / "hybrid")
    truth_cfg = load_config(args.config)
    from hybrid_twin.models import get_model

    truth = get_model(truth_cfg.data.virtual.model)
    a = truth.parameter("a_si").typical
    t_si = truth.parameter("t_si").typical
    s_true = 1.0 - a * np.cos(2 * math.pi * (t - t_si) / 1440.0)
    corr = float(np.corrcoef(mult, s_true)[0, 1])

    def ratio(a_, b_, split="test"):
        return results[a_][f"{split}_rmse"] / results[b_][f"{split}_rmse"]

    record = {
        "benchmark": "hybrid_value", **device_info(), "config": args.config, "n": args.n,
        "hybrid_epochs": args.epochs, "node_epochs": args.node_epochs,
        "condition_until": truth_cfg.evaluation.condition_until,
        "results": results,
        "hybrid_vs_mechanistic_test": ratio("hybrid", "mechanistic"),
        "hybrid_vs_neural_ode_test": ratio("hybrid", "neural_ode"),
        "hybrid_vs_mechanistic_val": ratio("hybrid", "mechanistic", "val"),
        "hybrid_vs_neural_ode_val": ratio("hybrid", "neural_ode", "val"),
        "no_effect_hybrid_vs_mechanistic_test": ratio("hybrid_no_effect",
                                                      "mechanistic_no_effect"),
        "no_effect_hybrid_vs_mechanistic_val": ratio("hybrid_no_effect",
                                                     "mechanistic_no_effect", "val"),
        "learned_multiplier_corr_with_truth": corr,
        "learned_multiplier_max_over_min": float(mult.max() / mult.min()),
        "true_multiplier_max_over_min": float(s_true.max() / s_true.min()),
    }
    emit(record, args.out)


if __name__ == "__main__":
    main()
