"""HDF5 cohort store: round trip, slices, streaming, atomic writes, bad files."""

import dataclasses
import os

import h5py
import numpy as np
import pytest

from hybrid_twin.data import (
    Cohort,
    CohortFileError,
    cohort_h5_size,
    iter_cohort_h5,
    read_cohort_h5,
    write_cohort_h5,
)
from hybrid_twin.data import hdf5 as store
from hybrid_twin.datasets import load_theophylline


def assert_same(a: Cohort, b: Cohort):
    assert a.ids == b.ids
    assert a.observable_names == b.observable_names and a.covariate_names == b.covariate_names
    for name in store.ARRAYS:
        np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)))
    for name in store.SCHEDULE_ARRAYS:
        np.testing.assert_array_equal(np.asarray(getattr(a.schedule, name)),
                                      np.asarray(getattr(b.schedule, name)))


@pytest.fixture
def theo():
    return load_theophylline()


def test_round_trip_and_attributes(tmp_path, theo):
    path = tmp_path / "theo.h5"
    write_cohort_h5(theo, path, observable_units=("mg/L",), time_unit="h", chunk_patients=5)
    assert_same(read_cohort_h5(path), theo)
    with h5py.File(path) as f:
        assert f.attrs["schema_version"] == store.SCHEMA_VERSION
        assert list(f.attrs["observable_units"]) == ["mg/L"]
        assert f["obs_values"].chunks[0] == 5 and f["obs_values"].compression == "gzip"
    assert cohort_h5_size(path) == 12


def test_slices_and_streaming(tmp_path, theo):
    path = tmp_path / "theo.h5"
    write_cohort_h5(theo, path, chunk_patients=4)
    assert_same(read_cohort_h5(path, 3, 8), theo.select(range(3, 8)))
    parts = list(iter_cohort_h5(path, 5))
    assert [p.n_patients for p in parts] == [5, 5, 2]
    assert_same(Cohort.concatenate(parts), theo)
    with pytest.raises(IndexError, match="outside 0:12"):
        read_cohort_h5(path, 9, 3)


def test_interrupted_write_keeps_the_previous_file(tmp_path, theo, monkeypatch):
    path = tmp_path / "cohort.h5"
    write_cohort_h5(theo.select(range(4)), path)
    before = path.read_bytes()

    real_append = store.CohortH5Writer.append

    def half_written(self, cohort):
        real_append(self, cohort.select(range(2)))
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(store.CohortH5Writer, "append", half_written)
    with pytest.raises(KeyboardInterrupt):
        write_cohort_h5(theo, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["cohort.h5"]
    assert read_cohort_h5(path).n_patients == 4


def test_other_schema_version_is_refused(tmp_path, theo):
    path = tmp_path / "old.h5"
    write_cohort_h5(theo, path)
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(CohortFileError, match="schema version 99.*reads version 1"):
        read_cohort_h5(path)


def test_truncated_and_corrupted_files(tmp_path, theo):
    path = tmp_path / "c.h5"
    write_cohort_h5(theo, path)
    data = path.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CohortFileError, match="cut.h5"):
        read_cohort_h5(cut)
    bad = tmp_path / "bad.h5"
    with h5py.File(path) as f:
        offset = f["obs_values"].id.get_chunk_info(0).byte_offset
    flipped = bytearray(data)
    for i in range(offset + 8, offset + 40):
        flipped[i] ^= 0xFF
    bad.write_bytes(bytes(flipped))
    with pytest.raises(CohortFileError, match="corrupted"):
        read_cohort_h5(bad)
    text = tmp_path / "text.h5"
    text.write_text("ID,TIME\n")
    with pytest.raises(CohortFileError, match="not a readable HDF5 file"):
        read_cohort_h5(text)
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        read_cohort_h5(tmp_path / "nope.h5")


def test_chunked_writer_appends(tmp_path, theo):
    path = tmp_path / "grown.h5"
    with store.CohortH5Writer(path, chunk_patients=3) as w:
        w.append(theo.select(range(5)))
        w.append(theo.select(range(5, 12)))
    assert_same(read_cohort_h5(path), theo)
    with pytest.raises(ValueError, match="differs from the first"):
        with store.CohortH5Writer(tmp_path / "x.h5") as w:
            w.append(theo)
            w.append(dataclasses.replace(theo.select([0]), covariate_names=("AGE",)))
    assert not (tmp_path / "x.h5").exists()
