"""Strict data import: event-table rules, HDF5 cohorts checked against the model, splits by
patient ID, pseudonymous IDs, and `load_cohort` (no JAX compilation: readers only)."""

import csv
import random
import types

import h5py
import numpy as np
import pytest

from hybrid_twin.data import (
    CohortFileError,
    DataFileNotFoundError,
    EventTableError,
    data_fingerprint,
    load_cohort,
    load_pseudonym_key,
    pseudonymise_id,
    read_cohort_h5,
    read_event_table,
    write_cohort_h5,
)
from hybrid_twin.data import hdf5 as store
from hybrid_twin.datasets import load_theophylline, theophylline_path
from hybrid_twin.errors import InputError
from hybrid_twin.models import BergmanMinimal, OneCompartment

PK = OneCompartment()
KEY = b"0123456789abcdef-test-key"
TABLE = """ID,TIME,EVID,DV,AMT,CMT,MDV,WT
alice,0,1,,100,depot,1,70
alice,1,0,2.5,,,0,70
alice,2,0,1.5,,,0,70
bob,0,1,,100,depot,1,80
bob,1,0,3.5,,,0,80
"""


def write(tmp_path, text, name="events.csv"):
    path = tmp_path / name
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    return path


def problems(tmp_path, text, model=PK, **kw):
    with pytest.raises(EventTableError) as err:
        read_event_table(write(tmp_path, text), model, **kw)
    return err.value.problems


def same_cohort(a, b):
    assert a.ids == b.ids and a.covariate_names == b.covariate_names
    for x, y in zip(a.__dict__.values(), b.__dict__.values()):
        if hasattr(x, "shape"):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for name in store.SCHEDULE_ARRAYS:
        np.testing.assert_array_equal(np.asarray(getattr(a.schedule, name)),
                                      np.asarray(getattr(b.schedule, name)))


# --- event tables ----------------------------------------------------------------------

@pytest.mark.parametrize("header,cols", [
    ("ID,TIME,EVID,DV,time", "TIME (column 2) and time (column 5)"),
    ("ID,TIME,DV,EVID,DV", "DV (column 3) and DV (column 5)"),
    ("ID,TIME,EVID,DV,wt,WT ", "wt (column 5) and WT (column 6)"),
])
def test_duplicate_columns_are_errors(tmp_path, header, cols):
    n = header.count(",") + 1
    found = problems(tmp_path, f"{header}\n" + ",".join(["1"] + ["0"] * (n - 1)) + "\n")
    assert len(found) == 1 and found[0].startswith("line 1: duplicate columns")
    assert cols in found[0]


def test_an_ignored_duplicate_resolves_it_and_ignored_columns_must_exist(tmp_path):
    text = "ID,TIME,EVID,DV,time\n1,0,0,3,99\n1,1,0,4,99\n"
    c = read_event_table(write(tmp_path, text), PK, ignore_columns=("time",))
    np.testing.assert_array_equal(np.asarray(c.obs_times[0]), [0.0, 1.0])
    assert c.covariate_names == ()
    found = problems(tmp_path, text, ignore_columns=("time", "SPLIT"))
    assert found == ["line 1: ignored column 'SPLIT' is not in the header "
                     "(ID, TIME, EVID, DV, time)"]


def test_mdv_only_0_or_1(tmp_path):
    found = problems(tmp_path, "ID,TIME,EVID,DV,MDV\n1,0,0,3,0\n1,1,0,3,2\n1,2,0,,1\n")
    assert len(found) == 1 and found[0].endswith("events.csv:3: MDV '2'; expected 0 (DV "
                                                  "present) or 1 (DV missing)")


def test_byte_order_mark_is_accepted(tmp_path):
    plain = read_event_table(write(tmp_path, TABLE), PK)
    bom = read_event_table(write(tmp_path, b"\xef\xbb\xbf" + TABLE.encode(), "bom.csv"), PK)
    same_cohort(plain, bom)


def test_non_utf8_byte_names_offset_and_line(tmp_path):
    data = TABLE.replace("bob,1,0", "b\xf6b,1,0").encode("latin-1")
    offset = data.index(b"\xf6")
    found = problems(tmp_path, data)
    assert len(found) == 1
    assert "events.csv:6: byte 0xf6 at byte offset " \
        f"{offset} (byte 2 of the line) is not UTF-8" in found[0]
    bom = b"\xef\xbb\xbf" + data   # offsets count the byte-order mark
    assert f"offset {offset + 3} " in problems(tmp_path, bom)[0]


@pytest.mark.parametrize("sep,word", [(";", ";"), ("\t", "tab")])
def test_other_delimiters_get_a_hint(tmp_path, sep, word):
    text = TABLE.replace(",", sep)
    found = problems(tmp_path, text)
    assert found == [f"line 1: the file seems to be {word}-delimited; event tables are "
                     f"comma-separated (header: {text.splitlines()[0]!r})"]


def test_implausible_magnitudes(tmp_path):
    text = TABLE.replace("bob,1,0,3.5", "bob,1,0,1e308").replace("alice,2,0,1.5,,,0,70",
                                                                   "alice,2,0,1.5,,,0,-2e13")
    found = problems(tmp_path, text)
    assert any(p.endswith("events.csv:4: covariate WT -2e13 is beyond the plausible "
                          "magnitude 1e+12 (data.max_abs_value)") for p in found)
    assert any(p.endswith("events.csv:6: DV 1e308 is beyond the plausible magnitude "
                          "1e+12 (data.max_abs_value)") for p in found)
    ok = read_event_table(write(tmp_path, TABLE.replace("3.5", "2e12")), PK,
                          max_abs_value=1e13)
    assert float(ok.obs_values[1, 0]) == 2e12


SEX = """ID,TIME,EVID,DV,SEX,WT
1,0,0,3,M,70
1,1,0,4,M,70
2,0,0,3,F,60
3,0,0,3,,65
4,0,0,3,F,61
"""


def test_text_covariate_is_one_problem_naming_the_fix(tmp_path):
    found = problems(tmp_path, SEX + "4,1,0,3,X,61\n")
    assert len(found) == 1
    assert found[0].endswith(
        "events.csv:2: covariate SEX holds text ('M', 'F', 'X'; 3 distinct value(s) in 5 "
        "row(s)); covariates must be numbers: leave it out with `data.ignore_columns: "
        "[SEX]`, or set `data.categorical: one_hot` (0/1 covariates) or `ignore` (drop text "
        "columns)")
    hidden = problems(tmp_path, SEX, pseudonym_key=KEY)
    assert len(hidden) == 1 and "holds text (2 distinct value(s) in 4 row(s))" in hidden[0]
    assert "'M'" not in hidden[0]
    many = "ID,TIME,EVID,DV,NOTE\n" + "".join(f"1,{t},0,3,note {t}\n" for t in range(500))
    assert len(problems(tmp_path, many)) == 1


def test_text_covariate_ignored_or_one_hot(tmp_path):
    path = write(tmp_path, SEX)
    notes = {}
    c = read_event_table(path, PK, categorical="ignore", notes=notes)
    assert c.covariate_names == ("WT",) and notes == {"categorical_ignored": ["SEX"]}
    notes = {}
    c = read_event_table(path, PK, categorical="one_hot", notes=notes)
    assert c.covariate_names == ("SEX=F", "SEX=M", "WT")
    np.testing.assert_array_equal(np.asarray(c.covariates),
                                  [[0, 1, 70], [1, 0, 60], [np.nan, np.nan, 65], [1, 0, 61]])
    assert notes == {"one_hot": {"SEX": ["F", "M"]}}
    found = problems(tmp_path, SEX + "4,1,0,3,M,61\n", categorical="one_hot")
    assert found == [f"{path}:7: covariate SEX changes within ID 4 ('F' at line 6, 'M' "
                     "here); covariates must be constant per patient"]
    with pytest.raises(InputError, match="data.categorical 'drop'"):
        read_event_table(path, PK, categorical="drop")


NO_OBS = TABLE + "carol,0,1,,100,depot,1,60\ndave,0,1,,100,depot,1,60\ndave,2,0,,,,1,60\n"


def test_patients_without_observations(tmp_path):
    found = problems(tmp_path, NO_OBS)
    assert len(found) == 1 and "2 patient(s) without any observation with a value" in found[0]
    assert "ID(s) carol, dave;" in found[0]
    c = read_event_table(write(tmp_path, NO_OBS), PK, require_observations=False)
    assert c.ids == ("alice", "bob", "carol", "dave")
    assert not np.asarray(c.data_mask)[2:].any()
    hidden = problems(tmp_path, NO_OBS, pseudonym_key=KEY)[0]
    assert "line(s) 7, 8" in hidden and "carol" not in hidden and "dave" not in hidden


def test_time_unit_conversion_equals_a_hand_converted_table(tmp_path):
    model = BergmanMinimal()   # minutes
    hours = """ID,TIME,EVID,DV,OBS,AMT,RATE,CMT
1,0,1,,,50,0,meal
1,0.25,0,95,glucose,,,
1,0.5,1,,,2,4,insulin
1,1.5,0,12,insulin,,,
"""
    minutes = """ID,TIME,EVID,DV,OBS,AMT,RATE,CMT
1,0,1,,,50,0,meal
1,15,0,95,glucose,,,
1,30,1,,,2,0.0666666666666666666,insulin
1,90,0,12,insulin,,,
"""
    notes = {}
    a = read_event_table(write(tmp_path, hours), model, time_unit="h", notes=notes)
    b = read_event_table(write(tmp_path, minutes, "min.csv"), model)
    same_cohort(a, b)
    assert notes == {"time_unit": {"data": "h", "model": "min", "factor": 60.0}}
    same_cohort(read_event_table(write(tmp_path, minutes, "min.csv"), model, time_unit="min"),
                b)
    with pytest.raises(InputError, match="data.time_unit 'hours' is not a known time unit; "
                                         "expected one of s, min, h, d"):
        read_event_table(write(tmp_path, hours), model, time_unit="hours")


def test_units_in_the_header_are_converted_to_the_models(tmp_path):
    """TIME [min], DV (ng/mL), AMT [g], RATE [g/min] read as the same cohort as the table
    written in the model's units (h, mg/L, mg, mg/h)."""
    model_units = """ID,TIME,EVID,DV,AMT,RATE,CMT
1,0,1,,320,0,depot
1,0.5,0,4.2,,,
1,2,1,,100,50,central
1,3,0,7.5,,,
"""
    other_units = """ID,TIME [min],EVID,DV (ng/mL),AMT [g],RATE [g/min],CMT
1,0,1,,0.32,0,depot
1,30,0,4200,,,
1,120,1,,0.1,0.000833333333333333333,central
1,180,0,7500,,,
"""
    notes = {}
    a = read_event_table(write(tmp_path, other_units), PK, notes=notes)
    b = read_event_table(write(tmp_path, model_units, "h.csv"), PK)
    for x, y in ((a.obs_times, b.obs_times), (a.obs_values, b.obs_values),
                 (a.schedule.dose_times, b.schedule.dose_times),
                 (a.schedule.dose_amounts, b.schedule.dose_amounts),
                 (a.schedule.dose_rates, b.schedule.dose_rates)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12)
    assert notes["units"] == {"TIME": "min", "DV": "ng/mL", "AMT": "g", "RATE": "g/min"}
    # without a unit of its own, RATE is in AMT's unit per TIME's unit
    no_rate_unit = other_units.replace("RATE [g/min]", "RATE")
    c = read_event_table(write(tmp_path, no_rate_unit, "r.csv"), PK)
    np.testing.assert_allclose(np.asarray(c.schedule.dose_rates),
                               np.asarray(b.schedule.dose_rates), rtol=1e-12)
    # the same units declared by the caller (data.units) instead of the header
    plain = other_units.replace(" [min]", "").replace(" (ng/mL)", "").replace(
        " [g]", "").replace(" [g/min]", "")
    d = read_event_table(write(tmp_path, plain, "p.csv"), PK, time_unit="min",
                         units={"DV": "ng/mL", "AMT": "g", "RATE": "g/min"})
    np.testing.assert_allclose(np.asarray(d.obs_values), np.asarray(b.obs_values), rtol=1e-12)


@pytest.mark.parametrize("header, kw, message", [
    ("ID,TIME,EVID,DV [mmol/L],OBS,AMT,CMT", {},
     "DV is in 'mmol/L' but observable glucose of BergmanMinimal is in 'mg/dL'"),
    ("ID,TIME,EVID,DV,OBS,AMT [mg],CMT", {},
     "AMT is in 'mg' but dose target insulin of BergmanMinimal is in 'U'"),
    ("ID,TIME [hours],EVID,DV,OBS,AMT,CMT", {}, "TIME unit 'hours' is not a time unit"),
    ("ID [x],TIME,EVID,DV,OBS,AMT,CMT", {}, "column 'ID [x]' (column 1) carries a unit"),
    ("ID,TIME [h],EVID,DV,OBS,AMT,CMT", {"time_unit": "min"},
     "the header gives TIME in 'h' but data.time_unit says 'min'"),
    ("ID,TIME,EVID,DV [g/L],OBS,AMT,CMT", {"units": {"DV": "mg/dL"}},
     "the header gives DV in 'g/L' but data.units says 'mg/dL'"),
    ("ID,TIME,EVID,DV,OBS,AMT,CMT", {"units": {"WT": "kg"}},
     "data.units: 'WT' is not a column with a unit"),
])
def test_units_that_do_not_convert_are_errors(tmp_path, header, kw, message):
    body = "\n".join(GLUCOSE.splitlines()[1:]) + "\ng2,5,1,,,2,insulin\n"
    found = problems(tmp_path, header + "\n" + body, BergmanMinimal(), **kw)
    assert any(message in p for p in found), found
    if "is in" in message:
        # named once per quantity that cannot take the unit (DV: glucose and insulin;
        # AMT in mg converts for meals, in g), at the first row that needs it
        assert len(found) == (2 if message.startswith("DV") else 1), found
        assert all(p.startswith(str(tmp_path / "events.csv") + ":") for p in found)


# --- HDF5 cohorts ----------------------------------------------------------------------

GLUCOSE = """ID,TIME,EVID,DV,OBS,AMT,CMT
g1,0,1,,,50,meal
g1,10,0,95,glucose,,
g1,20,0,11,insulin,,
g2,0,0,90,glucose,,
"""


@pytest.fixture(scope="module")
def theo():
    return load_theophylline()


def test_glucose_cohort_refused_by_the_pk_model(tmp_path):
    glucose = BergmanMinimal()
    cohort = read_event_table(write(tmp_path, GLUCOSE), glucose)
    path = tmp_path / "g.h5"
    write_cohort_h5(cohort, path, model=glucose)
    with h5py.File(path) as f:
        assert f.attrs["model_name"] == "glucose.BergmanMinimal"
        assert list(f.attrs["dose_target_names"]) == ["meal", "insulin"]
        assert list(f.attrs["input_names"]) == ["carb_rate"] and f.attrs["time_unit"] == "min"
    same_cohort(read_cohort_h5(path, model=glucose), cohort)
    with pytest.raises(CohortFileError) as err:
        read_cohort_h5(path, model=PK)
    assert str(err.value) == (
        f"{path}: cohort made for glucose.BergmanMinimal (observables glucose, insulin) "
        "cannot be read into pkpd.OneCompartment (observables concentration): observables "
        "glucose, insulin in the file, concentration in the model; dose targets meal, "
        "insulin in the file, depot, central in the model; inputs carb_rate in the file, "
        "(none) in the model; time unit min in the file, h in the model")


def test_older_files_are_checked_on_what_they_record(tmp_path, theo):
    glucose = BergmanMinimal()
    old = tmp_path / "old.h5"
    write_cohort_h5(read_event_table(write(tmp_path, GLUCOSE), glucose), old)
    with h5py.File(old) as f:
        assert "model_name" not in f.attrs
    with pytest.raises(CohortFileError, match="cohort made for a model with observables "
                                              "glucose, insulin cannot be read into "
                                              "pkpd.OneCompartment"):
        read_cohort_h5(old, model=PK)
    theo_old = tmp_path / "theo.h5"
    write_cohort_h5(theo, theo_old)
    assert read_cohort_h5(theo_old, model=PK).n_patients == theo.n_patients


@pytest.mark.parametrize("dataset,index,value,message", [
    ("obs_index", (3, 2), 1, "patient 3 (ID 4) slot 2: observable index outside 0..0"),
    ("schedule/dose_targets", (5, 0), 7, "patient 5 (ID 6) slot 0: dose target index outside "
                                         "0..1"),
    ("obs_values", (1, 4), np.nan, "patient 1 (ID 2) slot 4: observed value is not finite"),
    ("schedule/dose_amounts", (0, 0), np.inf, "patient 0 (ID 1) slot 0: amount of the dose is "
                                              "not finite"),
])
def test_unusable_patient_data_is_named(tmp_path, theo, dataset, index, value, message):
    path = tmp_path / "theo.h5"
    write_cohort_h5(theo, path, model=PK)
    with h5py.File(path, "a") as f:
        f[dataset][index] = value
    with pytest.raises(CohortFileError, match="1 problem") as err:
        read_cohort_h5(path)
    assert message in str(err.value)
    with pytest.raises(CohortFileError) as err:   # slices name the file's patient index
        read_cohort_h5(path, index[0], index[0] + 1)
    assert message in str(err.value)
    with pytest.raises(CohortFileError) as err:
        read_cohort_h5(path, model=PK, pseudonym_key=KEY)
    pseudo = pseudonymise_id(theo.ids[index[0]], KEY)
    assert f"(ID {pseudo})" in str(err.value) and f"(ID {theo.ids[index[0]]})" not in str(err.value)


def test_missing_values_are_not_unusable(tmp_path, theo):
    path = tmp_path / "theo.h5"
    write_cohort_h5(theo, path, model=PK)
    with h5py.File(path, "a") as f:
        f["obs_values"][1, 4] = np.nan
        f["obs_missing"][1, 4] = True
    assert bool(read_cohort_h5(path, model=PK).obs_missing[1, 4])


# --- splits ----------------------------------------------------------------------------

def test_split_is_by_patient_id_not_row_order(tmp_path, theo):
    with open(theophylline_path(), newline="") as fh:
        header, *rows = list(csv.reader(fh))
    by_id = {}
    for r in rows:
        by_id.setdefault(r[0], []).append(r)
    order = list(by_id)
    random.Random(1).shuffle(order)
    assert order != list(by_id)
    with open(tmp_path / "shuffled.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header] + [r for pid in order for r in by_id[pid]])
    shuffled = read_event_table(tmp_path / "shuffled.csv", PK)
    assert shuffled.ids == tuple(order)
    fractions = {"train": 0.67, "val": 0.0, "test": 0.33}
    for seed in (0, 1):
        a, b = theo.split(fractions, seed), shuffled.split(fractions, seed)
        for part in fractions:
            assert sorted(a[part].ids) == sorted(b[part].ids)
            k = b[part].ids.index(a[part].ids[0]) if a[part].ids else None
            if k is not None:
                np.testing.assert_array_equal(np.asarray(a[part].obs_values[0]),
                                              np.asarray(b[part].obs_values[k]))
    assert [len(theo.split(fractions, 0)[p].ids) for p in fractions] == [8, 0, 4]
    assert theo.split(fractions, 0)["test"].ids != theo.split(fractions, 1)["test"].ids


# --- pseudonyms ------------------------------------------------------------------------

def test_pseudonyms_are_stable_and_keyed(tmp_path):
    p = pseudonymise_id("alice", KEY)
    assert p == pseudonymise_id("alice", KEY) and p.startswith("P") and len(p) == 13
    assert p != pseudonymise_id("alice", KEY + b"x") and p != pseudonymise_id("bob", KEY)
    id_map, notes = {}, {}
    c = read_event_table(write(tmp_path, TABLE), PK, pseudonym_key=KEY, id_map=id_map,
                         notes=notes)
    assert c.ids == (pseudonymise_id("alice", KEY), pseudonymise_id("bob", KEY))
    assert id_map == dict(zip(("alice", "bob"), c.ids)) and notes == {"pseudonymised": 2}


def test_messages_name_no_raw_id_when_pseudonymised(tmp_path):
    text = TABLE + "bob,0.5,0,1,,,0,80\nbob,2,0,1,,,0,81\n"
    plain = problems(tmp_path, text)
    assert any("ID bob" in p for p in plain)
    hidden = problems(tmp_path, text, pseudonym_key=KEY)
    assert len(hidden) == len(plain) and not any("bob" in p for p in hidden)
    assert any(f"ID {pseudonymise_id('bob', KEY)}" in p for p in hidden)


def test_pseudonym_key_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("HT_TEST_KEY", raising=False)
    with pytest.raises(InputError, match="set the environment variable HT_TEST_KEY "
                                         r"\(data.pseudonym_key_env\) or data.pseudonym_key_file"):
        load_pseudonym_key("HT_TEST_KEY", None)
    monkeypatch.setenv("HT_TEST_KEY", "short")
    with pytest.raises(InputError, match="holds only 5 bytes") as err:
        load_pseudonym_key("HT_TEST_KEY", None)
    assert "short" not in str(err.value)
    monkeypatch.setenv("HT_TEST_KEY", KEY.decode())
    assert load_pseudonym_key("HT_TEST_KEY", None) == KEY
    key_file = tmp_path / "key"
    key_file.write_text("\n")
    with pytest.raises(InputError, match="data.pseudonym_key_file: .*key holds no key"):
        load_pseudonym_key("HT_TEST_KEY", key_file)
    with pytest.raises(InputError, match="data.pseudonym_key_file: cannot read"):
        load_pseudonym_key("HT_TEST_KEY", tmp_path / "nope")
    key_file.write_bytes(b"file-key-0123456789\n")
    assert load_pseudonym_key("HT_TEST_KEY", key_file) == b"file-key-0123456789"


# --- load_cohort -----------------------------------------------------------------------

def data_cfg(**kw):
    base = dict(source="csv", path=None, virtual=None, time_unit=None, ignore_columns=[],
                categorical="error", max_abs_value=1e12, pseudonymise=False,
                pseudonym_key_env="HT_TEST_KEY", pseudonym_key_file=None, pseudonym_map=None,
                units=None)
    return types.SimpleNamespace(**{**base, **kw})


def test_load_cohort_csv_options_and_pseudonym_map(tmp_path, monkeypatch):
    monkeypatch.setenv("HT_TEST_KEY", KEY.decode())
    (tmp_path / "data").mkdir()
    write(tmp_path / "data", SEX)
    cfg = data_cfg(path="events.csv", categorical="one_hot", ignore_columns=["WT"],
                   pseudonymise=True)
    cohort, vc, notes = load_cohort(cfg, PK, config_dir=tmp_path / "data")
    assert vc is None and cohort.covariate_names == ("SEX=F", "SEX=M")
    assert cohort.ids == tuple(pseudonymise_id(i, KEY) for i in "1234")
    assert notes == {"source": "csv", "ignored_columns": ["WT"], "one_hot": {"SEX": ["F", "M"]},
                     "pseudonymised": 4, "patients": 4}
    assert not list(tmp_path.rglob("*map*"))   # the map only on request
    run = tmp_path / "run"
    with pytest.raises(InputError, match="data.pseudonym_map: .* lies inside the run "
                                         "directory"):
        load_cohort(data_cfg(**{**vars(cfg), "pseudonym_map": str(run / "m.csv")}), PK,
                    config_dir=tmp_path / "data", run_dir=run)
    with pytest.raises(InputError, match="data.pseudonym_map is set but data.pseudonymise "
                                         "is false"):
        load_cohort(data_cfg(**{**vars(cfg), "pseudonymise": False,
                                "pseudonym_map": "m.csv"}), PK, config_dir=tmp_path / "data")
    (tmp_path / "data" / "private").mkdir()
    _, _, notes = load_cohort(data_cfg(**{**vars(cfg), "pseudonym_map": "private/map.csv"}),
                              PK, config_dir=tmp_path / "data", run_dir=run)
    with open(tmp_path / "data" / "private" / "map.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows == [["RAW_ID", "PSEUDONYM"]] + [[i, pseudonymise_id(i, KEY)] for i in "1234"]
    assert notes["pseudonym_map"] == str((tmp_path / "data" / "private" / "map.csv").resolve())
    assert not any(i in repr(notes) for i in ("'1'", "'2'"))


def test_load_cohort_rejections(tmp_path):
    with pytest.raises(DataFileNotFoundError, match=r"data.path: .*nope.csv does not exist "
                                                    r"\(relative to"):
        load_cohort(data_cfg(path="nope.csv"), PK, config_dir=tmp_path)
    with pytest.raises(InputError, match="data.path is required when data.source is 'csv'"):
        load_cohort(data_cfg(), PK)
    with pytest.raises(InputError, match=r"is a folder; expected a file \(event table\)"):
        load_cohort(data_cfg(path=str(tmp_path)), PK)
    csv_path = write(tmp_path, NO_OBS)
    with pytest.raises(CohortFileError, match="not a readable HDF5 file"):
        load_cohort(data_cfg(source="hdf5", path=str(csv_path)), PK)
    with pytest.raises(EventTableError, match="without any observation"):
        load_cohort(data_cfg(path=str(csv_path)), PK)
    cohort, _, _ = load_cohort(data_cfg(path=str(csv_path)), PK, for_simulation=True)
    assert cohort.n_patients == 4
    h5 = tmp_path / "c.h5"
    write_cohort_h5(cohort, h5, model=PK)
    with pytest.raises(InputError, match=r"2 patient\(s\) without any observation .* "
                                         r"patient\(s\) 2 \(ID carol\), 3 \(ID dave\)"):
        load_cohort(data_cfg(source="hdf5", path=str(h5)), PK)
    assert load_cohort(data_cfg(source="hdf5", path=str(h5)), PK,
                       for_simulation=True)[0].ids == cohort.ids
    with pytest.raises(InputError, match="data.time_unit 'min': only csv event tables are "
                                         "converted"):
        load_cohort(data_cfg(source="hdf5", path=str(h5), time_unit="min"), PK)
    with pytest.raises(InputError, match="data.units: only csv event tables are converted"):
        load_cohort(data_cfg(source="hdf5", path=str(h5), units={"DV": "ug/mL"}), PK)
    # data.units reaches the event-table reader: DV in ng/mL is divided by 1000
    plain, _, notes = load_cohort(data_cfg(path=str(write(tmp_path, TABLE, "t.csv"))), PK)
    scaled, _, notes = load_cohort(data_cfg(path=str(tmp_path / "t.csv"),
                                            units={"DV": "ng/mL"}), PK)
    np.testing.assert_allclose(np.asarray(scaled.obs_values), np.asarray(plain.obs_values) / 1e3)
    assert notes["units"] == {"DV": "ng/mL"}


def test_data_fingerprint(tmp_path):
    from hybrid_twin.config import DataConfig, VirtualConfig

    path = write(tmp_path, TABLE)
    first = data_fingerprint(data_cfg(path="events.csv"), config_dir=tmp_path)
    assert len(first) == 64
    assert data_fingerprint(data_cfg(path=str(path))) == first
    path.write_text(TABLE.replace("3.5", "7.0"))
    assert data_fingerprint(data_cfg(path=str(path))) != first
    a = data_fingerprint(DataConfig(source="virtual", virtual=VirtualConfig(n=5)))
    assert a == data_fingerprint(DataConfig(source="virtual", virtual=VirtualConfig(n=5)))
    assert a != data_fingerprint(DataConfig(source="virtual", virtual=VirtualConfig(n=6)))
    cohort, _, notes = load_cohort(DataConfig(source="csv", path=str(path)), PK)
    assert cohort.ids == ("alice", "bob") and notes == {"source": "csv", "patients": 2}
