"""Cohort data: the `Cohort` container, CSV event tables, the HDF5 store, virtual cohorts,
pseudonymous IDs, and `load_cohort` for a config's `data` block."""

from .cohort import Cohort
from .events import (
    DataFileNotFoundError,
    EventTableError,
    read_event_table,
    write_event_table,
)
from .hdf5 import (
    CohortFileError,
    cohort_h5_size,
    iter_cohort_h5,
    read_cohort_h5,
    write_cohort_h5,
)
from .load import data_fingerprint, load_cohort
from .pseudonym import (
    load_pseudonym_key,
    pseudonymise_id,
    pseudonymise_ids,
    write_pseudonym_map,
)

__all__ = [
    "Cohort", "CohortFileError", "DataFileNotFoundError", "EventTableError", "cohort_h5_size",
    "data_fingerprint", "iter_cohort_h5", "load_cohort", "load_pseudonym_key",
    "pseudonymise_id", "pseudonymise_ids", "read_cohort_h5", "read_event_table",
    "write_cohort_h5", "write_event_table", "write_pseudonym_map",
]
