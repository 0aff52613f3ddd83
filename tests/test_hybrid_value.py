"""Hybrid value, small scale: on patients whose insulin sensitivity follows a daily cycle
the Bergman model lacks, the trained hybrid (a learned time-of-day modulation of the
insulin-action term) forecasts the afternoon and evening far better than the mechanistic
model; on patients without the cycle it is no worse. The full comparison, with the neural
ODE baseline, is `python -m benchmarks.hybrid_value`."""

import json
import math

import numpy as np
import pytest

from hybrid_twin.config import load_config
from training.run import load_trained_model, run_experiment

SMALL = ["data.virtual.n=48", "population.max_rounds=2", "training.epochs=12",
         "training.batch_size=8", "output.plots=false"]


def forecast_rmse(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    return np.mean([m[s]["rmse"]["glucose"] for s in ("val", "test")])


def run(tmp_path, name, extra):
    cfg = load_config("configs/glucose_hybrid.yaml", [*SMALL, *extra])
    return run_experiment(cfg, tmp_path / name)


@pytest.mark.parametrize("truth", ["glucose.BergmanCircadian", "glucose.BergmanMinimal"])
def test_hybrid_beats_mechanism_only_where_the_mechanism_is_incomplete(tmp_path, truth):
    data = [f"data.virtual.model={truth}"]
    mech = forecast_rmse(run(tmp_path, "mech", [*data, "model.learned=[]"]))
    hyb_dir = run(tmp_path, "hybrid", data)
    hyb = forecast_rmse(hyb_dir)
    if truth == "glucose.BergmanCircadian":
        assert hyb <= 0.75 * mech, (hyb, mech)
        # the learned multiplier of p3 (I - Ib) follows the true daily cycle over the
        # hours with meals and insulin (at night I = Ib and the term carries no signal)
        model = load_trained_model(hyb_dir)
        closure = model.closures[0]
        t = np.arange(420.0, 1381.0, 20.0)
        x = np.stack([np.sin(2 * math.pi * t / 1440), np.cos(2 * math.pi * t / 1440)], -1)
        mult = 1.0 + np.asarray(closure.net(x))[:, 0]
        true = 1.0 - 0.4 * np.cos(2 * math.pi * (t - 420.0) / 1440.0)
        assert np.corrcoef(mult, true)[0, 1] > 0.85
        assert t[np.argmin(mult)] <= 600.0 and t[np.argmax(mult)] >= 1080.0
        # the trained twin simulates new virtual patients from its run directory
        from hybrid_twin.cli import main

        sim = tmp_path / "sim"
        assert main(["simulate", "configs/glucose_hybrid.yaml", "--set", "data.virtual.n=6",
                     "--model-from", str(hyb_dir), "--out", str(sim)]) == 0
        summary = json.loads((sim / "summary.json").read_text())
        assert summary["learned"] and summary["failed_patients"] == 0
    else:
        assert hyb <= 1.05 * mech, (hyb, mech)
