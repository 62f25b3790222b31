"""The exporter's view of one stack: where it goes in BIDS and which files make it up.

`ExportStack` is built by the export service from the catalog (`shared.catalog.StackSummary`), the
sorter's classification (datatype, suffix, entities, constructs, provenance) and the instance files it
downloaded. It deliberately does not import the sorter: the fields below are the whole contract.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from services.exporter.bids.entities import EntityValue
from shared.catalog import StackSummary


def parse_dicom_datetime(date: str | None, time: str | None) -> datetime | None:
    """A naive datetime from a DICOM DA (`YYYYMMDD`) and TM (`HHMMSS.FFFFFF`, `HH:MM:SS` also read).

    Without a date only the time of day is known; it is placed on 1900-01-01 so that ordering
    within a session still works. Returns `None` when there is no usable time.
    """
    day = (date or "").strip().replace("-", "")
    clock = (time or "").strip().replace(":", "")
    if not clock and not day:
        return None
    try:
        base = datetime.strptime(day, "%Y%m%d") if day else datetime(1900, 1, 1)
    except ValueError:
        return None
    if not clock:
        return base
    whole, _, frac = clock.partition(".")
    whole = whole.ljust(6, "0")[:6]
    try:
        hms = datetime.strptime(whole, "%H%M%S")
    except ValueError:
        return base
    micro = int((frac + "000000")[:6]) if frac.isdigit() else 0
    return base.replace(hour=hms.hour, minute=hms.minute, second=hms.second, microsecond=micro)


class ExportStack(BaseModel):
    """One stack to export.

    `subject` and `session` are labels (sanitized on naming; `session=None` means no `ses-` level).
    `datatype`/`suffix`/`entities` come from the classification (`bids_datatype`, `bids_suffix`,
    `entities` such as `echo`, `part`, `inv`, `dir`, `acq`, `ce`, `rec`, `task`, `run`).
    `acquisition_date` is the (already shifted, when anonymization shifted dates) DICOM DA of the
    acquisition and `acquisition_time` its DICOM TM; together they order runs and fill `acq_time`.
    `constructs` and `provenance` are the sorter's axes; they send derived maps (ADC, FA, CBF, QSM,
    processed SWI, ...) to `derivatives/` and group SyMRI. `files` are the stack's DICOM instances
    on local disk.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    subject: str
    session: str | None = None
    datatype: str
    suffix: str
    entities: dict[str, EntityValue] = Field(default_factory=dict)
    intent: str | None = None
    constructs: list[str] = Field(default_factory=list)
    provenance: str | None = None
    task_name: str | None = None  # BIDS TaskName for func; defaults to the task- label
    acquisition_date: str | None = None
    acquisition_time: str | None = None
    files: list[Path] = Field(default_factory=list)
    summary: StackSummary

    @property
    def key(self) -> str:
        """The stack's identity in a run: `<SeriesInstanceUID>|<stack_key>`."""
        return f"{self.summary.series_instance_uid}|{self.summary.stack_key}"

    @property
    def acquired_at(self) -> datetime | None:
        """When the stack was acquired (shifted date + time), for run order and `acq_time`."""
        return parse_dicom_datetime(
            self.acquisition_date or self.summary.study_date,
            self.acquisition_time or self.summary.acquisition_time,
        )
