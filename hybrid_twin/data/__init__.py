"""Cohort data: the `Cohort` container, CSV event tables, the HDF5 store, virtual cohorts."""

from .cohort import Cohort
from .events import EventTableError, read_event_table, write_event_table
from .hdf5 import (
    CohortFileError,
    cohort_h5_size,
    iter_cohort_h5,
    read_cohort_h5,
    write_cohort_h5,
)

__all__ = [
    "Cohort", "CohortFileError", "EventTableError", "cohort_h5_size", "iter_cohort_h5",
    "read_cohort_h5", "read_event_table", "write_cohort_h5", "write_event_table",
]
