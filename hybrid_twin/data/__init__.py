"""Cohort data: the `Cohort` container and CSV event-table import/export."""

from .cohort import Cohort
from .events import EventTableError, read_event_table, write_event_table

__all__ = ["Cohort", "EventTableError", "read_event_table", "write_event_table"]
