"""A pseudonymised run of configs/theophylline.yaml leaves no raw patient ID anywhere: not in
any file of the run directory (CSV, JSON, YAML, logs, checkpoints, PNG bytes and metadata),
nor in what the command prints or logs. The study's IDs (1 to 12) are replaced by
distinctive ones first, so that a search for them means something."""

import csv
import json
import logging
import shutil

from hybrid_twin.cli import main
from hybrid_twin.datasets import theophylline_path
from hybrid_twin.data import pseudonymise_id

KEY = "a-test-key-of-at-least-16-bytes"


def raw_id(n: str) -> str:
    return f"Theo-Subject-{int(n):02d}"


def test_a_pseudonymised_run_writes_no_raw_id(tmp_path, monkeypatch, capsys, caplog):
    data = tmp_path / "data"
    data.mkdir()
    with open(theophylline_path(), newline="") as fh:
        rows = list(csv.reader(fh))
    ids = sorted({raw_id(r[0]) for r in rows[1:]})
    with open(data / "theo.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([rows[0]] + [[raw_id(r[0]), *r[1:]] for r in rows[1:]])
    shutil.copy("configs/theophylline.yaml", tmp_path / "theophylline.yaml")
    monkeypatch.setenv("HYBRID_TWIN_PSEUDONYM_KEY", KEY)
    run = tmp_path / "run"
    private = tmp_path / "private"
    private.mkdir()
    caplog.set_level(logging.DEBUG)
    code = main(["run", str(tmp_path / "theophylline.yaml"), "--out", str(run),
                 "--pseudonymise", "--set", f"data.path={data / 'theo.csv'}",
                 "--set", f"data.pseudonym_map={private / 'map.csv'}",
                 "--set", "population.max_rounds=3"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    files = [p for p in run.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".csv", ".json", ".yaml", ".jsonl", ".png"} <= kinds, kinds
    texts = {str(p): p.read_bytes() for p in files}
    texts["stdout"] = printed.out.encode()
    texts["stderr"] = printed.err.encode()
    texts["log records"] = caplog.text.encode()
    leaks = [(where, i) for i in ids for where, blob in texts.items() if i.encode() in blob]
    assert not leaks, leaks[:5]
    # the run did use the pseudonyms: they are the IDs of its predictions
    with open(run / "predictions.csv", newline="") as fh:
        seen = {r["ID"] for r in csv.DictReader(fh)}
    expected = {pseudonymise_id(i, KEY.encode()) for i in ids}
    assert seen and seen <= expected
    # the run's log says what the import did
    data_event = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()
                  if '"event": "data"' in line][-1]
    assert data_event["imported"]["pseudonymised"] == 12
    assert data_event["imported"]["pseudonym_map"] == str((private / "map.csv").resolve())
    # the key is never written, and the map only where it was asked for (outside the run)
    assert not [w for w, blob in texts.items() if KEY.encode() in blob]
    with open(private / "map.csv", newline="") as fh:
        mapping = {r["RAW_ID"]: r["PSEUDONYM"] for r in csv.DictReader(fh)}
    assert mapping == {i: pseudonymise_id(i, KEY.encode()) for i in ids}

