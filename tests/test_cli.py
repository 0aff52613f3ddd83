"""The command line and the quick-start run write what they promise."""

import csv
import json

from hybrid_twin.cli import main


def test_models_lists_every_model(capsys):
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    for name in ("BergmanMinimal", "OneCompartment", "TwoCompartment"):
        assert name in text
    assert "Fisher (1991)" in text and "mg/dL" in text


def test_simulate_writes_a_complete_output(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["simulate", "--n", "4", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_patients"] == 4 and summary["failed_patients"] == 0
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 * 289
    glucose = [float(r["PRED"]) for r in rows]
    assert 20 < min(glucose) and max(glucose) < 600
    assert (out / "params.csv").read_text().startswith("ID,p1,p2,p3")


def test_bench_dispatches_to_the_benchmark(capsys):
    assert main(["bench", "simulate", "--n", "8", "--scipy-n", "2", "--repeats", "1",
                 "--skip-handwritten"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["N"] == 8 and record["hybrid_twin_ensemble"]["failed_patients"] == 0


def test_simulate_from_a_config_and_a_trained_run(tmp_path, capsys):
    """Config-driven simulation in chunks, with progress lines; with --model-from the
    trained hybrid of a finished run is simulated."""
    out = tmp_path / "sim"
    assert main(["simulate", "configs/quickstart.yaml", "--set", "data.virtual.n=10",
                 "--chunk", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "simulated 4/10 patients" in text and "simulated 10/10 patients" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_patients"] == 10 and summary["failed_patients"] == 0
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["STATUS"] for r in rows} == {"ok"} and len({r["ID"] for r in rows}) == 10
    glucose = [float(r["PRED"]) for r in rows]
    assert 20 < min(glucose) and max(glucose) < 600
    # the same patients in one chunk give the same predictions
    one = tmp_path / "one"
    assert main(["simulate", "configs/quickstart.yaml", "--set", "data.virtual.n=10",
                 "--out", str(one)]) == 0
    assert (one / "predictions.csv").read_text() == (out / "predictions.csv").read_text()
    assert main(["simulate", "configs/quickstart.yaml", "--set", "data.virtual.nn=3"]) == 2
    assert "did you mean 'data.virtual.n'" in capsys.readouterr().err
