"""Trustworthy run directories: fingerprints and resume, completion, per-patient status,
strict outputs, and input checks before any compute.

One small calibration run of the theophylline data (12 patients, one-compartment model,
every patient a test patient, no population fit) is shared by most tests; the runs made
here reuse its compiled programs (same shapes and solver), except the `max_steps: 1` run.
"""

import csv
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from hybrid_twin.calibrate import FitFailed, out_of_bounds
from hybrid_twin.config import load_config
from hybrid_twin.errors import InputError, RunDirectoryError, RunFailed
from hybrid_twin.models import OneCompartment
from training.evaluate import evaluate_run
from training.run import build_cohort, run_experiment

THEOPHYLLINE = Path(__file__).resolve().parents[1] / "hybrid_twin/datasets/theophylline.csv"


def config(csv_path, *overrides, **sections):
    """A small calibration experiment on `csv_path`: every patient a test patient,
    calibrated on TIME <= 3 h with a fixed additive error, forecast after."""
    data = {
        "name": "integrity",
        "model": {"name": "pkpd.OneCompartment", "free": ["ka", "CL", "V"]},
        "data": {"source": "csv", "path": str(csv_path)},
        "split": {"train": 0.0, "val": 0.0, "test": 1.0, "seed": 0},
        "error_model": {"kind": "additive", "additive": 1.0, "estimate": False},
        "population": {"fit": False, "max_rounds": 1},
        "calibration": {"max_iter": 8},
        "evaluation": {"condition_until": 3.0, "splits": ["test"]},
        "output": {"plots": False},
        **sections,
    }
    return load_config(data=data, overrides=list(overrides))


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def strict(text):
    """json.loads that refuses NaN and Infinity."""
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The shared run: (its config, its CSV, its run directory)."""
    root = tmp_path_factory.mktemp("integrity")
    data = root / "theophylline.csv"
    shutil.copy(THEOPHYLLINE, data)
    cfg = config(data)
    out = run_experiment(cfg, root / "run")
    return cfg, data, out


def copy_run(base, tmp_path):
    _, _, out = base
    return Path(shutil.copytree(out, tmp_path / "run"))


def test_a_finished_run_records_its_fingerprint_and_completion(base):
    cfg, data, out = base
    record = strict((out / "run.json").read_text())
    assert record["status"] == "complete"
    assert record["completed"] == ["train", "calibrate", "predict"]
    text = (out / "config.yaml").read_text()
    assert record["config_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert record["data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert record["code"]["hybrid_twin"] and "git" in record["code"]
    assert record["started"] <= record["ended"]
    # run.json is written last: nothing of the run is newer
    newest = max(p.stat().st_mtime_ns for p in out.iterdir() if p.name != "run.json")
    assert (out / "run.json").stat().st_mtime_ns >= newest
    assert {r["STATUS"] for r in rows(out / "predictions.csv")} == {"ok"}
    params = rows(out / "params.csv")
    assert {r["STATUS"] for r in params} == {"ok"} and len(params) == 12
    assert all(r["CONVERGED"] == "True" and r["OUT_OF_BOUNDS"] == "" for r in params)
    metrics = strict((out / "metrics.json").read_text())
    assert metrics["test"]["n_patients"] == 12 and metrics["test"]["n_failed"] == 0


def test_resume_is_refused_after_the_data_changed_and_force_restart_starts_over(
        base, tmp_path):
    cfg_base, _, _ = base
    data = tmp_path / "theophylline.csv"
    shutil.copy(THEOPHYLLINE, data)
    cfg = config(data)
    out = run_experiment(cfg, tmp_path / "run")
    params = (out / "params.csv").read_text()
    record = (out / "run.json").read_text()
    old_sha = hashlib.sha256(data.read_bytes()).hexdigest()
    table = rows(data)
    for r in table:
        if r["DV"]:
            r["DV"] = repr(2 * float(r["DV"]))
    with open(data, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    new_sha = hashlib.sha256(data.read_bytes()).hexdigest()
    with pytest.raises(RunDirectoryError) as err:
        run_experiment(cfg, out)
    message = str(err.value)
    assert f"the data file {data} changed since the run began" in message
    assert f"{old_sha[:12]}… -> {new_sha[:12]}…" in message
    assert "--force-restart" in message and "--out" in message
    # refused before anything was touched
    assert (out / "params.csv").read_text() == params
    assert (out / "run.json").read_text() == record

    (out / "notes.txt").write_text("the user's own file")
    run_experiment(cfg, out, force_restart=True)
    assert (out / "notes.txt").read_text() == "the user's own file"
    restarted = strict((out / "run.json").read_text())
    assert restarted["status"] == "complete" and restarted["resumed"] is False
    assert restarted["data"]["sha256"] == new_sha
    assert '"resumed": true' not in (out / "log.jsonl").read_text()  # the log started over
    # the estimates are those of the new data (doubled concentrations: a smaller volume)
    v_old = np.array([float(r["V"]) for r in csv.DictReader(params.splitlines())])
    v_new = np.array([float(r["V"]) for r in rows(out / "params.csv")])
    assert np.all(v_new < 0.8 * v_old), (v_new / v_old)


def test_resume_is_refused_after_the_config_or_the_code_changed(base, monkeypatch):
    import training.run as runner

    cfg, data, out = base
    record = (out / "run.json").read_text()
    with pytest.raises(RunDirectoryError, match=r"different config \(changed: "
                                                r"calibration\.max_iter: 8 -> 9\)"):
        run_experiment(config(data, "calibration.max_iter=9"), out)
    real = runner.code_version()
    monkeypatch.setattr(runner, "code_version", lambda: {**real, "git": "0" * 40})
    with pytest.raises(RunDirectoryError, match=r"other code .*'git': '0000000000"):
        run_experiment(cfg, out)
    assert (out / "run.json").read_text() == record


def test_cli_pseudonymised_run_holds_no_raw_id_and_force_restart_starts_over(
        base, tmp_path, monkeypatch, capsys):
    """`hybrid-twin run CONFIG --pseudonymise`, from another directory, with a config file
    whose data.path is relative to it: no raw patient ID in any file of the run directory
    nor in the output; the same run without the flag is refused (another config, exit 2)
    and `--force-restart` starts it over with the raw IDs."""
    from hybrid_twin.cli import main
    from hybrid_twin.config import resolved
    from hybrid_twin.data import pseudonymise_id

    cfg, _, _ = base
    raw = {str(i): f"subject-{i:02d}" for i in range(1, 13)}
    table = rows(THEOPHYLLINE)
    for r in table:
        r["ID"] = raw[r["ID"]]
    study = tmp_path / "study"
    study.mkdir()
    with open(study / "events.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    spec = resolved(cfg)
    spec["data"]["path"] = "events.csv"
    (study / "run.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    key = "a-test-key-of-32-characters-long"
    monkeypatch.setenv("HYBRID_TWIN_PSEUDONYM_KEY", key)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    argv = ["run", "study/run.yaml", "--out", str(out)]

    assert main([*argv, "--pseudonymise"]) == 0
    said = capsys.readouterr()
    ids = {r["ID"] for r in rows(out / "predictions.csv")}
    assert ids == {pseudonymise_id(i, key.encode()) for i in raw.values()}
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 5
    for raw_id in raw.values():
        assert raw_id not in said.out + said.err
        for p in files:
            assert raw_id.encode() not in p.read_bytes(), p

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hybrid-twin: error: {out} holds a run of a different config "
                          "(changed: data.pseudonymise: True -> False)")
    assert main([*argv, "--force-restart"]) == 0
    assert {r["ID"] for r in rows(out / "predictions.csv")} == set(raw.values())
    assert strict((out / "run.json").read_text())["resumed"] is False


def test_an_unchanged_run_resumes(base, tmp_path):
    cfg, _, out = base
    again = run_experiment(cfg, copy_run(base, tmp_path))
    record = strict((again / "run.json").read_text())
    assert record["status"] == "complete" and record["resumed"] is True
    assert '"resumed": true' in (again / "log.jsonl").read_text()
    for name in ("predictions.csv", "params.csv"):
        assert (again / name).read_text() == (out / name).read_text()


def test_an_unfinished_run_is_refused_by_evaluate_and_resumed_by_run(base, tmp_path):
    """A run killed between predictions.csv and metrics.json: run.json still says
    "running"; evaluate refuses it, run finishes it (and clears what the killed writer
    left, nothing else)."""
    cfg, _, out = base
    run = copy_run(base, tmp_path)
    record = strict((run / "run.json").read_text())
    record.update(status="running", ended=None)
    (run / "run.json").write_text(json.dumps(record))
    (run / "metrics.json").unlink()
    orphans = [run / ".metrics.json.k2x9_q7a.tmp", run / "checkpoints" / ".population.json"
               ".abcdefgh.tmp"]
    keep = [run / ".hidden.tmp", run / "notes.tmp", run / "data.csv"]
    for p in orphans + keep:
        p.write_text("x")
    with pytest.raises(RunDirectoryError, match="has not finished"):
        evaluate_run(run)
    run_experiment(cfg, run)
    assert strict((run / "run.json").read_text())["status"] == "complete"
    assert not any(p.exists() for p in orphans) and all(p.exists() for p in keep)
    metrics = evaluate_run(run)
    before = strict((out / "metrics.json").read_text())
    assert metrics["test"]["rmse"] == pytest.approx(before["test"]["rmse"], rel=1e-12)
    (run / "run.json").unlink()
    with pytest.raises(RunDirectoryError, match="no run.json"):
        evaluate_run(run)


def test_a_torn_predictions_file_names_its_line(base, tmp_path):
    run = copy_run(base, tmp_path)
    lines = (run / "predictions.csv").read_text().splitlines(keepends=True)
    (run / "predictions.csv").write_text("".join(lines[:4]) + lines[4][:20])
    with pytest.raises(InputError, match=r"predictions\.csv:5: the last line is incomplete"):
        evaluate_run(run)
    torn = lines[2].rsplit(",", 3)[0] + "\n"
    (run / "predictions.csv").write_text("".join(lines[:2] + [torn] + lines[3:]))
    with pytest.raises(InputError, match=r"predictions\.csv:3: expected 9 fields, got 6"):
        evaluate_run(run)


def test_an_out_path_that_is_a_file_is_refused(tmp_path, base):
    cfg, _, _ = base
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirectoryError, match="is not a directory"):
        run_experiment(cfg, tmp_path / "file")


@pytest.mark.parametrize("cut", [-1.0, 24.65, 100.0])
def test_a_forecast_cut_outside_the_data_is_refused(base, tmp_path, cut):
    _, data, _ = base
    with pytest.raises(InputError, match=rf"evaluation\.condition_until: {cut:g} is .* "
                                         r"observations from 0 to 24\.65"):
        run_experiment(config(data, f"evaluation.condition_until={cut}"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_failed_and_dataless_patients_are_marked_and_leave_the_others_unchanged(
        base, tmp_path, monkeypatch):
    """One patient dosed with 1e300 fails (its predictions empty, strict JSON metrics
    without it); one without observations before the cut is `no_data`, not converged,
    with population predictions; the other patients' results are those of the run
    without either change."""
    import training.run as runner

    cfg, _, out = base
    model = OneCompartment()
    cohort, _ = build_cohort(cfg, model)
    huge, empty = 2, 5
    amounts = np.asarray(cohort.schedule.dose_amounts).copy()
    amounts[huge] = np.where(np.asarray(cohort.schedule.dose_mask)[huge], 1e300, 0.0)
    missing = np.asarray(cohort.obs_missing).copy()
    missing[empty] |= np.asarray(cohort.obs_times)[empty] <= 3.0
    changed = dataclasses.replace(
        cohort, obs_missing=jnp.asarray(missing),
        schedule=dataclasses.replace(cohort.schedule, dose_amounts=jnp.asarray(amounts)))
    monkeypatch.setattr(runner, "build_cohort", lambda cfg, model, **kw: (changed, None))
    run = run_experiment(cfg, tmp_path / "run")

    metrics = strict((run / "metrics.json").read_text())
    test = metrics["test"]
    assert test["n_patients"] == 12 and test["n_failed"] == 1
    assert test["status"] == {"ok": 10, "no_data": 1, "solver_failure:nonfinite": 1}
    assert all(np.isfinite(v) for v in test["rmse"].values())
    ids = cohort.ids
    new = {(r["ID"], r["TIME"]): r for r in rows(run / "predictions.csv")}
    old = {(r["ID"], r["TIME"]): r for r in rows(out / "predictions.csv")}
    assert new.keys() == old.keys()
    for (pid, _), r in new.items():
        if pid == ids[huge]:
            assert r["STATUS"] == "solver_failure:nonfinite"
            assert r["PRED"] == r["PRED_LO"] == r["PRED_HI"] == ""
        elif pid == ids[empty]:
            assert r["STATUS"] == "no_data" and np.isfinite(float(r["PRED"]))
        else:
            assert r["STATUS"] == "ok"
            for col in ("PRED", "PRED_LO", "PRED_HI"):
                assert float(r[col]) == pytest.approx(float(old[(pid, r["TIME"])][col]),
                                                      rel=1e-9, abs=1e-12)
    params = {r["ID"]: r for r in rows(run / "params.csv")}
    assert params[ids[huge]]["STATUS"] == "solver_failure:nonfinite"
    assert params[ids[huge]]["CONVERGED"] == "False" and params[ids[huge]]["V"] == ""
    assert params[ids[empty]]["STATUS"] == "no_data"
    assert params[ids[empty]]["CONVERGED"] == "False"
    # a patient without data keeps the population's typical values
    assert float(params[ids[empty]]["V"]) == pytest.approx(
        float(model.typical_params()[model.index("param", "V")]), rel=1e-9)
    assert test["converged_fraction"] == pytest.approx(10 / 12)


def test_a_run_in_which_every_patient_fails_reports_it(tmp_path, base, capsys):
    """`solver.max_steps: 1`: the population stage has no patient to fit, every
    calibration and forecast fails; the outputs say so (empty predictions, never 0.0),
    run.json records "failed" and `RunFailed` is raised. `hybrid-twin simulate` alike."""
    from training.simulate import simulate_experiment

    _, data, _ = base
    cfg = config(data, "solver.max_steps=1", "population.fit=true",
                 split={"train": 0.5, "val": 0.0, "test": 0.5, "seed": 0},
                 evaluation={"condition_until": 3.0, "splits": ["train", "test"]})
    with pytest.raises(RunFailed, match=r"every one of the 12 patients failed "
                                        r"\(solver_failure:max_steps: 12\)"):
        run_experiment(cfg, tmp_path / "run")
    run = tmp_path / "run"
    record = strict((run / "run.json").read_text())
    assert record["status"] == "failed" and "solver_failure:max_steps" in record["reason"]
    assert "population: none of the 6 patients could be fitted" in record["reason"]
    predictions = rows(run / "predictions.csv")
    assert len(predictions) == 132
    assert all(r["PRED"] == r["PRED_LO"] == r["PRED_HI"] == "" for r in predictions)
    assert {r["STATUS"] for r in predictions} == {"solver_failure:max_steps"}
    params = rows(run / "params.csv")
    assert {r["STATUS"] for r in params} == {"solver_failure:max_steps"}
    assert all(r["CONVERGED"] == "False" and r["CL"] == "" for r in params)
    metrics = strict((run / "metrics.json").read_text())
    for split in ("train", "test"):
        assert metrics[split]["n_failed"] == metrics[split]["n_patients"] == 6
        assert metrics[split]["rmse"] == {}
    text = capsys.readouterr().out
    assert "test: 6 patients, 6 failed (solver_failure:max_steps: 6)" in text
    with pytest.raises(RunDirectoryError, match=r"failed \("):
        evaluate_run(run)

    with pytest.raises(RunFailed, match="every one of the 12 patients failed"):
        simulate_experiment(cfg, tmp_path / "sim", progress=lambda *a, **k: None)
    simulated = rows(tmp_path / "sim" / "predictions.csv")
    assert all(r["PRED"] == "" for r in simulated)
    assert {r["STATUS"] for r in simulated} == {"solver_failure:max_steps"}
    summary = strict((tmp_path / "sim" / "summary.json").read_text())
    assert summary["failed_patients"] == 12 and summary["observables"] == {}


def test_patients_stopped_at_the_iteration_limit_are_not_converged(base, tmp_path):
    _, data, _ = base
    run = run_experiment(config(data, "calibration.max_iter=1"), tmp_path / "run")
    params = rows(run / "params.csv")
    assert {r["STATUS"] for r in params} == {"not_converged"}
    assert {r["CONVERGED"] for r in params} == {"False"}
    test = strict((run / "metrics.json").read_text())["test"]
    assert test["converged_fraction"] == 0.0 and test["n_failed"] == 0
    assert {r["STATUS"] for r in rows(run / "predictions.csv")} == {"not_converged"}


def test_estimates_outside_the_declared_bounds_are_flagged(base, tmp_path, monkeypatch,
                                                         capsys):
    cfg, _, out = base
    q = OneCompartment.parameters[2]
    assert q.name == "V"
    narrow = (*OneCompartment.parameters[:2], dataclasses.replace(q, upper=32.0))
    monkeypatch.setattr(OneCompartment, "parameters", narrow)
    run = run_experiment(cfg, tmp_path / "run")
    params = rows(run / "params.csv")
    outside = [r["ID"] for r in params if float(r["V"]) > 32.0]
    assert 0 < len(outside) < len(params)
    assert {r["ID"]: r["OUT_OF_BOUNDS"] for r in params} == {
        r["ID"]: "V" if r["ID"] in outside else "" for r in params}
    metrics = strict((run / "metrics.json").read_text())
    assert metrics["test"]["out_of_bounds"] == {"V": len(outside)}
    assert (f"estimates outside their declared bounds: V ({len(outside)} patients)"
            in capsys.readouterr().out)
    # the flag changes nothing else
    assert [r["V"] for r in params] == [r["V"] for r in rows(out / "params.csv")]


def test_a_diverging_population_fit_fails_the_run(base, tmp_path, capsys):
    """Concentrations in the wrong unit (x 1e5) against an additive error of 1 to be
    estimated: the error scale explodes, and the population stage fails with its values
    instead of running on."""
    _, data, _ = base
    table = rows(data)
    for r in table:
        if r["DV"]:
            r["DV"] = repr(1e5 * float(r["DV"]))
    scaled = tmp_path / "theophylline.csv"
    with open(scaled, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    cfg = config(scaled, "population.fit=true", "error_model.estimate=true",
                 split={"train": 1.0, "val": 0.0, "test": 0.0, "seed": 0},
                 evaluation={"condition_until": 3.0, "splits": ["train"]})
    with pytest.raises(FitFailed, match=r"population \(round 1\): the residual error "
                                        r"estimate diverged: additive sd \(additive "
                                        r"[0-9.e+]+, .* times its start") as err:
        run_experiment(cfg, tmp_path / "run")
    assert isinstance(err.value, RunFailed) and err.value.diverged
    record = strict((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "failed" and record["failed_stage"] == "population"
    assert "diverged" in record["reason"]
    assert not (tmp_path / "run" / "params.csv").exists()


def test_training_without_validation_data_after_the_cut_is_refused(base, tmp_path,
                                                                  monkeypatch):
    """Hybrid training whose validation patients have nothing after condition_until is
    refused before any fit or training starts."""
    import hybrid_twin.population as population

    cfg, _, _ = base
    cohort, _ = build_cohort(cfg, OneCompartment())
    fractions = {"train": 0.5, "val": 0.25, "test": 0.25}
    val_ids = set(cohort.split(fractions, seed=0)["val"].ids)
    table = [r for r in rows(THEOPHYLLINE)
             if not (r["ID"] in val_ids and r["EVID"] == "0" and float(r["TIME"]) > 10.0)]
    data = tmp_path / "theophylline.csv"
    with open(data, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)

    def no_compute(*args, **kwargs):
        raise AssertionError("a fit started before the inputs were checked")

    monkeypatch.setattr(population, "fit_population", no_compute)
    monkeypatch.setattr(population, "train_population", no_compute)
    hybrid = config(data, "evaluation.condition_until=10.0", "population.fit=true",
                    split={**fractions, "seed": 0},
                    model={"name": "pkpd.OneCompartment", "free": ["ka", "CL", "V"],
                           "learned": [{"kind": "covariate_network", "params": ["CL"],
                                        "covariates": ["WT"], "width": 4, "depth": 1}]})
    with pytest.raises(InputError, match=rf"split\.val: the {len(val_ids)} validation "
                                         r"patients have no observation after "
                                         r"evaluation\.condition_until=10\.0"):
        run_experiment(hybrid, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_train_population_refuses_a_validation_set_without_forecast_data(base):
    from hybrid_twin.population import train_population

    cfg, _, _ = base
    cohort, _ = build_cohort(cfg, OneCompartment())
    with pytest.raises(InputError, match="no observation after val_condition_until=30"):
        train_population(OneCompartment(), cohort.select([0, 1]), cohort.select([2, 3]),
                         free=("ka", "CL", "V"), val_condition_until=30.0)


def test_population_divergence_and_bounds_are_loud():
    from hybrid_twin.calibrate import ErrorModel
    from hybrid_twin.population import _check_population

    model = OneCompartment()
    free = ("ka", "CL", "V")
    typical = np.asarray(model.typical_params(), float)
    em0 = ErrorModel("proportional", 1.0, 0.1, estimate=True)
    omega = np.full(3, 0.3)
    _check_population(model, free, typical, omega, em0.scaled(50.0), em0, 1)
    with pytest.raises(FitFailed, match=r"population \(round 2\): the residual error "
                                        r"estimate diverged.*4\.7e\+08") as err:
        _check_population(model, free, typical, omega, em0.scaled(4.7e9), em0, 2)
    assert err.value.diverged and err.value.stage == "population"
    bad = typical.copy()
    bad[model.index("param", "CL")] = np.nan
    with pytest.raises(FitFailed, match="non-finite typical value or spread of CL"):
        _check_population(model, free, bad, omega, em0, em0, 1)
    q = model.parameters[model.index("param", "V")]
    at = typical.copy()
    at[model.index("param", "V")] = q.upper
    with pytest.raises(FitFailed, match=rf"V = {q.upper:g} at its upper bound"):
        _check_population(model, free, at, omega, em0, em0, 1)
    outside = typical.copy()
    outside[model.index("param", "ka")] = model.parameters[model.index("param", "ka")].upper * 10
    assert out_of_bounds(model, np.stack([typical, outside])) == [[], ["ka"]]
