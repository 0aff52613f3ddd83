"""`hybrid-twin run`: every shipped config runs end to end and writes the run contract."""

import csv
import dataclasses
import json

import pytest

from hybrid_twin.cli import main
from hybrid_twin.data import read_event_table
from hybrid_twin.models import BergmanMinimal

SMALL = {
    "configs/quickstart.yaml": ["data.virtual.n=16", "data.virtual.horizon=720",
                                "evaluation.condition_until=400", "population.max_rounds=2",
                                "calibration.max_iter=10"],
    "configs/theophylline.yaml": ["population.max_rounds=3"],
    "configs/theophylline_covariates.yaml": ["population.max_rounds=1", "training.epochs=2"],
    "configs/glucose_hybrid.yaml": ["data.virtual.n=16", "data.virtual.horizon=720",
                                    "evaluation.condition_until=400",
                                    "population.max_rounds=2", "calibration.max_iter=10",
                                    "training.epochs=2", "training.batch_size=4"],
    "configs/t1d.yaml": ["data.virtual.n=12", "data.virtual.repeat_count=2",
                         "data.virtual.horizon=2880", "data.virtual.obs_every=30",
                         "evaluation.condition_until=1440", "population.max_rounds=2",
                         "calibration.max_iter=10"],
    "configs/pk_enterohepatic_hybrid.yaml": ["data.virtual.n=12", "population.max_rounds=2",
                                             "calibration.max_iter=10", "training.epochs=2"],
    "configs/t1d_bergman_hybrid.yaml": ["data.virtual.n=12", "data.virtual.repeat_count=2",
                                        "data.virtual.horizon=2880",
                                        "data.virtual.obs_every=60",
                                        "evaluation.condition_until=1440",
                                        "population.max_rounds=1", "calibration.max_iter=10",
                                        "training.epochs=2"],
}
KERNEL_RUN = "configs/glucose_hybrid.yaml"


STAGES = ("virtual_cohort", "fit_population", "train_population", "_weighted_rmse",
          "calibrate", "predict_with_intervals", "write_vpc", "batch_loss")


def record_solves(monkeypatch) -> list:
    """Make the run's configured backend one that records what it is asked: each entry
    of the returned list is (stages on the call stack, options) of a solve that reached
    `simulate`'s dispatch; ("solved", options) when the backend itself ran."""
    import importlib
    import inspect

    import training.run as runner
    from hybrid_twin.config import solver_options

    sim = importlib.import_module("hybrid_twin.simulate")  # the module, not the function
    asked: list = []

    def recording(backend):
        class Recording(type(backend)):
            def solve(self, model, batch, options):
                asked.append(("solved", options))
                return super().solve(model, batch, options)
        return Recording(**{f.name: getattr(backend, f.name)
                            for f in dataclasses.fields(backend)})

    def recorded(compiled):
        def entry(model, batch, *args):
            names = {f.function for f in inspect.stack()}
            asked.append((frozenset(names & set(STAGES)), args[-1]))
            return compiled(model, batch, *args)
        return entry

    monkeypatch.setattr(sim, "_solve_compiled", recorded(sim._solve_compiled))
    monkeypatch.setattr(sim, "_normal_compiled", recorded(sim._normal_compiled))
    monkeypatch.setattr(sim, "_sens_compiled", recorded(sim._sens_compiled))
    monkeypatch.setattr(runner, "solver_options", lambda cfg: dataclasses.replace(
        solver_options(cfg), backend=recording(solver_options(cfg).backend)))
    return asked


@pytest.mark.parametrize("config", sorted(SMALL))
def test_shipped_config_runs_end_to_end(config, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    hybrid = config == KERNEL_RUN
    # the hybrid run also shows that the configured solver reaches every stage: its
    # backend records each solve it is asked for (and by which stage)
    asked = record_solves(monkeypatch) if hybrid else None
    # (and that hybrid training runs on the kernel backend: interpret mode here)
    extra = (["solver.rtol=1e-7", "solver.max_steps=3000", "solver.backend=kernel",
              "solver.kernel.roll_stages=true"]
             if hybrid else [])
    assert main(["run", config, "--out", str(out),
                 *sum((["--set", s] for s in SMALL[config] + extra), [])]) == 0
    if hybrid:
        entries = [(who, o) for who, o in asked if who != "solved"]
        assert any(who == "solved" for who, _ in asked)
        for who, options in entries:
            # the training loss too: reverse mode w.r.t. network weights on the kernel
            assert options.backend.name == "kernel", sorted(who)
            assert type(options.backend).__name__ == "Recording"
            if "batch_loss" in who:
                assert options.differentiation == "reverse"
            assert (options.controller.rtol, options.max_steps) == (1e-7, 3000), sorted(who)
        assert set().union(*(who for who, _ in entries)) == set(STAGES)
        # training's own calibrations and validation, too
        assert any({"train_population", "calibrate"} <= who for who, _ in entries)
        assert any({"train_population", "_weighted_rmse"} <= who for who, _ in entries)
    text = capsys.readouterr().out
    assert "RMSE" in text and str(out.resolve()) in text
    for name in ("config.yaml", "metrics.json", "predictions.csv", "params.csv", "log.jsonl",
                 "fits.png", "pred_vs_obs.png", "vpc.png"):
        assert (out / name).exists(), name
    if "hybrid" in config or "covariates" in config:
        assert (out / "training.png").exists()
        assert "training_s" in json.loads((out / "metrics.json").read_text())["run"]["wall_s"]
    if "covariates" in config:  # the covariate network trained: it moves the subjects
        from training.run import load_trained_model

        model = load_trained_model(out)
        cohort = read_event_table("hybrid_twin/datasets/theophylline.csv", model)
        offsets = model.covariate_offsets(cohort.covariates, cohort.covariate_names)
        assert float(abs(offsets).max()) > 1e-4
    metrics = json.loads((out / "metrics.json").read_text())
    splits = [s for s in metrics if s != "run"]
    assert splits
    for s in splits:
        for obs, v in metrics[s]["rmse"].items():
            assert v > 0 and metrics[s]["mae"][obs] <= v
    assert metrics["run"]["seed"] == 0 and "jax" in metrics["run"]["versions"]
    if "quickstart" in config:
        test = metrics["test"]
        assert 0.5 <= test["coverage"]["glucose"] <= 1.0  # 4 test patients: a sanity range
        assert set(test["horizons"]) == {"60", "240", "720"}
        assert test["horizons"]["60"]["n"]["glucose"] < test["n"]["glucose"]
    for png in ("fits.png", "pred_vs_obs.png", "vpc.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["ID", "TIME", "OBS", "DV", "PRED", "PRED_LO", "PRED_HI", "SPLIT",
                             "STATUS"]
    assert {r["STATUS"] for r in rows} <= {"ok", "not_converged"}
    assert all(float(r["PRED_LO"]) <= float(r["PRED"]) <= float(r["PRED_HI"]) for r in rows)
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_predictions_reimport_as_an_event_table(tmp_path):
    out = tmp_path / "run"
    args = ["run", "configs/quickstart.yaml", "--out", str(out), "--set", "output.plots=false"]
    for s in SMALL["configs/quickstart.yaml"]:
        args += ["--set", s]
    assert main(args) == 0
    cohort = read_event_table(out / "predictions.csv", BergmanMinimal(),
                              ignore_columns=("PRED", "PRED_LO", "PRED_HI", "SPLIT",
                                              "STATUS"))
    assert cohort.n_patients > 0 and cohort.observable_names == ("glucose", "insulin")


def test_config_error_exits_2_before_compute(tmp_path, capsys):
    assert main(["run", "configs/quickstart.yaml", "--set", "data.virtual.nn=3"]) == 2
    assert "did you mean 'data.virtual.n'" in capsys.readouterr().err


def test_interrupted_run_resumes_with_the_same_metrics(tmp_path, monkeypatch, capsys):
    import training.run as runner

    args = ["--set", "output.plots=false"]
    for s in SMALL["configs/quickstart.yaml"]:
        args += ["--set", s]
    full = tmp_path / "full"
    assert main(["run", "configs/quickstart.yaml", "--out", str(full), *args]) == 0

    part = tmp_path / "part"
    real = runner._calibrate_split
    calls = []

    def interrupted(path, log, split, *a, **kw):
        calls.append(split)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed during the second split")
        return real(path, log, split, *a, **kw)

    monkeypatch.setattr(runner, "_calibrate_split", interrupted)
    capsys.readouterr()
    assert main(["run", "configs/quickstart.yaml", "--out", str(part), *args]) == 130
    assert capsys.readouterr().err == "hybrid-twin: interrupted\n"
    assert (part / "checkpoints" / "population.json").exists()
    assert not (part / "metrics.json").exists()
    monkeypatch.setattr(runner, "_calibrate_split", real)
    assert main(["run", "configs/quickstart.yaml", "--out", str(part), *args]) == 0
    log = (part / "log.jsonl").read_text()
    assert '"resumed": true' in log
    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((part / "metrics.json").read_text())
    for split in ("val", "test"):
        assert a[split]["rmse"] == pytest.approx(b[split]["rmse"], rel=1e-9)
    capsys.readouterr()
    assert main(["run", "configs/quickstart.yaml", "--out", str(part), *args,
                 "--set", "seed=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hybrid-twin: error: {part} holds a run of a different config "
                          "(changed: seed: 0 -> 1)")


def test_evaluate_recomputes_the_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "configs/theophylline.yaml", "--out", str(out), "--set",
            "population.max_rounds=2", "--set", "output.plots=false"]
    assert main(args) == 0
    before = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").unlink()
    assert main(["evaluate", str(out)]) == 0
    after = json.loads((out / "metrics.json").read_text())
    for split in ("train", "test"):
        assert after[split]["rmse"] == pytest.approx(before[split]["rmse"], rel=1e-12)
        assert after[split]["mae"] == pytest.approx(before[split]["mae"], rel=1e-12)
    assert "RMSE" in capsys.readouterr().out


def test_stage_commands_build_the_same_run(tmp_path):
    args = ["--set", "output.plots=false"]
    for s in SMALL["configs/quickstart.yaml"]:
        args += ["--set", s]
    staged = tmp_path / "staged"
    assert main(["calibrate", "configs/quickstart.yaml", "--out", str(staged), *args]) == 0
    assert (staged / "params.csv").exists() and not (staged / "predictions.csv").exists()
    assert main(["predict", "configs/quickstart.yaml", "--out", str(staged), *args]) == 0
    assert '"resumed": true' in (staged / "log.jsonl").read_text()
    whole = tmp_path / "whole"
    assert main(["run", "configs/quickstart.yaml", "--out", str(whole), *args]) == 0
    a = json.loads((staged / "metrics.json").read_text())
    b = json.loads((whole / "metrics.json").read_text())
    assert a["test"]["rmse"] == pytest.approx(b["test"]["rmse"], rel=1e-9)
    assert (staged / "params.csv").read_text() == (whole / "params.csv").read_text()


def test_t1d_hybrid_defaults_train_to_a_validation_plateau(tmp_path):
    """configs/t1d_hybrid.yaml, on a small cohort but with its training defaults (up to 200
    epochs, patience 10, learning-rate decay): training stops by itself once validation
    has not improved by 0.1% for 10 epochs, the validation forecast improved on the first
    epoch's, and the learned modulation of endogenous glucose production moved, rising in
    the morning, where the truth's dawn phenomenon is (06:00, glucose.HovorkaT1DDawn)."""
    import math

    import numpy as np

    from hybrid_twin.config import load_config
    from training.run import load_trained_model

    out = tmp_path / "run"
    over = ["data.virtual.n=16", "data.virtual.repeat_count=2", "data.virtual.horizon=2880",
            "data.virtual.obs_every=60", "evaluation.condition_until=1440",
            "population.max_rounds=1", "calibration.max_iter=20", "output.plots=false"]
    assert main(["run", "configs/t1d_hybrid.yaml", "--out", str(out),
                 *sum((["--set", s] for s in over), [])]) == 0
    tr = load_config(out / "config.yaml").training
    assert (tr.epochs, tr.patience, tr.min_delta) == (200, 10, 1e-3)
    hist = json.loads((out / "checkpoints" / "training" / "train_history.json").read_text())
    val = [h["val_rmse_weighted"] for h in hist]
    assert len(hist) < tr.epochs
    best_before = [min(val[:k]) for k in range(len(val) - tr.patience, len(val))]
    assert all(v >= b * (1 - tr.min_delta) for v, b in zip(val[-tr.patience:], best_before))
    assert min(val) < 0.9 * val[0], val
    model = load_trained_model(out)
    t = np.arange(0.0, 1440.0, 30.0)
    x = np.stack([np.sin(2 * math.pi * t / 1440), np.cos(2 * math.pi * t / 1440)], -1)
    mult = 1.0 + np.asarray(model.closures[0].net(x))[:, 0]
    assert mult.max() - mult.min() > 0.05, mult
    assert 240.0 <= t[np.argmax(mult)] <= 720.0, t[np.argmax(mult)]


def test_population_stage_fits_an_untrained_hybrid_switched_off():
    """An untrained hybrid whose terms add exactly nothing is fitted switched off (the
    same estimates, no network evaluated); a trained one, a "replace" closure (which
    removes the term) and a neural ODE are fitted as they are."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from hybrid_twin.hybrid import HybridModel, neural_ode, state_correction, term_closure
    from training.run import _untrained_equivalent

    mech = BergmanMinimal()
    corr = state_correction(mech, ("G",), ("G", "meal_on_board"), key=jax.random.PRNGKey(0))
    hyb = HybridModel(mech, (corr,))
    assert _untrained_equivalent(hyb) == hyb.switched_off()
    assert _untrained_equivalent(mech) is mech
    last = corr.net.mlp.layers[-1]
    trained = eqx.tree_at(lambda m: m.corrections[0].net.mlp.layers[-1].bias, hyb,
                          last.bias + jnp.ones_like(last.bias))
    assert _untrained_equivalent(trained) is trained
    rep = HybridModel(mech, (), (term_closure(mech, "insulin_action", ("I",),
                                              key=jax.random.PRNGKey(1)),))
    assert _untrained_equivalent(rep) is rep
    node = neural_ode(mech, key=jax.random.PRNGKey(2))
    assert _untrained_equivalent(node) is node
