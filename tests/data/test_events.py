"""CSV event tables: round trip, every kind of bad input, and use with simulate."""

import numpy as np
import pytest

from hybrid_twin import simulate
from hybrid_twin.data import Cohort, EventTableError, read_event_table, write_event_table
from hybrid_twin.models import BergmanMinimal, OneCompartment

GOOD = """ID,TIME,EVID,DV,AMT,RATE,CMT,MDV,WT,AGE
1,0,1,.,320,0,depot,1,79.6,30
1,0,0,0.74,.,.,.,0,79.6,30
1,0.25,0,2.84,,,,0,79.6,30
1,1,0,6.57,,,,0,79.6,30
1,2,0,.,,,,1,79.6,30
1,12,1,,320,,depot,1,79.6,30
1,12,0,5.1,,,,0,79.6,30
2,0,1,,100,50,central,1,72.4,41
2,0.5,0,1.2,,,,0,72.4,41
2,3,0,2.9,,,,0,72.4,41
"""


def write(tmp_path, text, name="events.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_read_good_table(tmp_path):
    model = OneCompartment()
    c = read_event_table(write(tmp_path, GOOD), model)
    assert c.ids == ("1", "2") and c.covariate_names == ("WT", "AGE")
    assert c.obs_times.shape == (2, 5)
    np.testing.assert_array_equal(np.asarray(c.obs_mask).sum(1), [5, 2])
    assert bool(c.obs_missing[0, 3]) and not bool(c.obs_missing[0, 2])
    np.testing.assert_allclose(c.covariates[1], [72.4, 41])
    np.testing.assert_allclose(c.schedule.dose_rates[1, 0], 50.0)
    assert int(c.schedule.dose_targets[1, 0]) == 1
    sol = simulate(model, np.tile(model.typical_params(), (2, 1)), c.schedule,
                   c.obs_times, c.obs_mask)
    assert np.all(np.asarray(sol.status) == 0)


def test_round_trip_is_lossless(tmp_path):
    model = OneCompartment()
    first = read_event_table(write(tmp_path, GOOD), model)
    out = tmp_path / "out.csv"
    write_event_table(first, out, model)
    second = read_event_table(out, model)
    assert second.ids == first.ids and second.covariate_names == first.covariate_names
    for a, b in zip(first.__dict__.values(), second.__dict__.values()):
        if hasattr(a, "shape"):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    write_event_table(second, tmp_path / "again.csv", model)
    assert (tmp_path / "again.csv").read_text() == out.read_text()


BAD = [
    ("ID,EVID,DV\n1,0,3\n", r"line 1: missing required column\(s\) TIME"),
    ("", r"line 1: the file is empty"),
    ("ID,TIME,EVID,DV\n", r"header but no rows"),
    ("ID,TIME,EVID,DV\n1,abc,0,3\n", r"events.csv:2: TIME 'abc' is not a number"),
    ("ID,TIME,EVID,DV\n1,1,0,x\n", r"events.csv:2: DV 'x' is not a number"),
    ("ID,TIME,EVID,DV\n1,1,0,nan\n", r"events.csv:2: DV is 'nan'; expected a finite number"),
    ("ID,TIME,EVID,DV\n1,inf,0,1\n", r"events.csv:2: TIME is 'inf'"),
    ("ID,TIME,EVID,DV\n1,-1,0,3\n", r"events.csv:2: TIME -1 is negative"),
    ("ID,TIME,EVID,DV\n1,2,0,3\n1,1,0,3\n", r"events.csv:3: TIME 1 is before .*line 2"),
    ("ID,TIME,EVID,DV,AMT,CMT\n1,0,1,,,depot\n", r"events.csv:2: dose row \(EVID=1\) needs AMT"),
    ("ID,TIME,EVID,DV,AMT,CMT\n1,0,1,,ten,depot\n", r"events.csv:2: AMT 'ten' is not a number"),
    ("ID,TIME,EVID,DV,AMT,CMT\n1,0,1,,-inf,depot\n", r"events.csv:2: AMT is '-inf'"),
    ("ID,TIME,EVID,DV,OBS\n1,0,0,3,glucose\n", r"events.csv:2: OBS 'glucose' is not an observable"),
    ("ID,TIME,EVID,DV,AMT,CMT\n1,0,1,,5,gut\n", r"events.csv:2: CMT 'gut' is not a dose target.*depot, central"),
    ("ID,TIME,EVID,DV,WT\n1,0,0,3,70\n1,1,0,3,71\n", r"events.csv:3: covariate WT changes within ID 1"),
    ("ID,TIME,EVID,DV\n1,0,0,3\n1,0,0,3\n", r"events.csv:3: duplicate of line 2"),
    ("ID,TIME,EVID,DV\n1,0,2,3\n", r"events.csv:2: EVID '2'"),
    ("ID,TIME,EVID,DV\n1,0,0\n", r"events.csv:2: 3 fields, expected 4"),
    ("ID,TIME,EVID,DV\n1,0,0,\n", r"events.csv:2: observation without DV"),
    ("ID,TIME,EVID,DV,SEX\n1,0,0,3,M\n", r"events.csv:2: covariate SEX holds text \('M'"),
]


@pytest.mark.parametrize("text,pattern", BAD)
def test_bad_input_names_line_and_reason(tmp_path, text, pattern):
    with pytest.raises(EventTableError, match=pattern):
        read_event_table(write(tmp_path, text), OneCompartment())


def test_every_bad_row_is_reported(tmp_path):
    text = "ID,TIME,EVID,DV\n1,0,0,3\n1,x,0,3\n1,1,0,y\n2,-3,0,1\n"
    with pytest.raises(EventTableError) as err:
        read_event_table(write(tmp_path, text), OneCompartment())
    assert [p.split(": ")[0].rsplit(":", 1)[1] for p in err.value.problems] == ["3", "4", "5"]


def test_obs_required_with_several_observables(tmp_path):
    text = "ID,TIME,EVID,DV\n1,0,0,90\n"
    with pytest.raises(EventTableError, match="OBS is empty; BergmanMinimal has observables glucose, insulin"):
        read_event_table(write(tmp_path, text), BergmanMinimal())


def test_split_and_concatenate(tmp_path):
    model = OneCompartment()
    rows = ["ID,TIME,EVID,DV,AMT,CMT"]
    for i in range(20):
        rows += [f"p{i},0,1,,100,depot", f"p{i},1,0,{i + 1},,", f"p{i},{2 + i % 3},0,1,,"]
    c = read_event_table(write(tmp_path, "\n".join(rows) + "\n"), model)
    parts = c.split({"train": 0.7, "val": 0.15, "test": 0.15}, seed=3)
    assert sum(p.n_patients for p in parts.values()) == 20
    assert set().union(*(set(p.ids) for p in parts.values())) == set(c.ids)
    again = c.split({"train": 0.7, "val": 0.15, "test": 0.15}, seed=3)
    assert again["test"].ids == parts["test"].ids
    joined = Cohort.concatenate([parts["train"], parts["test"]])
    assert joined.n_patients == parts["train"].n_patients + parts["test"].n_patients
    k = joined.ids.index(parts["test"].ids[0])
    np.testing.assert_array_equal(joined.obs_values[k], parts["test"].obs_values[0])
    with pytest.raises(ValueError, match="appears in more than one"):
        Cohort.concatenate([parts["train"], parts["train"]])


def test_interrupted_export_keeps_the_previous_file(tmp_path, monkeypatch):
    import csv as csv_module

    model = OneCompartment()
    cohort = read_event_table(write(tmp_path, GOOD), model)
    out = tmp_path / "out.csv"
    out.write_text("previous contents\n")

    class Exploding:
        def __init__(self, fh):
            self.rows = 0

        def writerow(self, row):
            self.rows += 1
            if self.rows > 3:
                raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(csv_module, "writer", Exploding)
    with pytest.raises(KeyboardInterrupt):
        write_event_table(cohort, out, model)
    assert out.read_text() == "previous contents\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.csv", "out.csv"]
