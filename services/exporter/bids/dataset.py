"""Dataset-level files: `dataset_description.json`, `participants.tsv/json`, `sessions.tsv`,
`scans.tsv`, `README`, `.bidsignore`, derivative descriptions, and the field-map links in sidecars.

Everything here is computed from the exported stacks and written once, after the last stack, so a
re-run over the same stacks rewrites the same bytes.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, Field

from services.exporter.bids.entities import load_entity_table, parse_bids_name, sanitize_label
from services.exporter.bids.fieldmaps import ScanRecord, bids_uri, link_fieldmaps, link_m0scans
from services.exporter.bids.plan import DERIVATIVES, load_naming_rules
from services.exporter.bids.sidecar import missing_required, slice_normal
from services.exporter.bids.stack import ExportStack, parse_dicom_datetime
from shared.subjects import subject_id_basis


class ExportedStack(BaseModel):
    """What one stack became, relative to the dataset root: JSON-serializable, so an item's result
    can be stored and the dataset files computed later, on another replica, without the files."""

    stack: ExportStack
    base: PurePosixPath
    images: list[PurePosixPath] = Field(default_factory=list)  # .nii / .nii.gz
    files: list[PurePosixPath] = Field(default_factory=list)
    sidecars: dict[str, dict[str, Any]] = Field(default_factory=dict)  # sidecar path -> content
    sources: dict[str, str] = Field(default_factory=dict)  # DICOM copy -> the local file it copies
    tool: str | None = None
    tool_version: str | None = None
    skipped: list[str] = Field(default_factory=list)  # images not exported, with the reason
    warnings: list[str] = Field(default_factory=list)


def cohortflow_version() -> str:
    try:
        return metadata.version("cohortflow")
    except metadata.PackageNotFoundError:
        return "unknown"


def format_acq_time(date: str | None, time: str | None) -> str:
    """BIDS `acq_time` (`YYYY-MM-DDThh:mm:ss`) from a DICOM DA and TM; `n/a` without a date."""
    if not (date or "").strip():
        return "n/a"
    moment = parse_dicom_datetime(date, time)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") if moment else "n/a"


def dataset_description(
    name: str,
    *,
    dcm2niix_version: str | None,
    dataset_type: str = "raw",
    tools: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """`dataset_description.json`: Name, BIDSVersion, DatasetType and GeneratedBy with versions."""
    generated = [
        {
            "Name": "Cohortflow",
            "Version": cohortflow_version(),
            "Description": "DICOM de-identification, cataloguing, classification and BIDS export",
        }
    ]
    if dcm2niix_version:
        generated.append({"Name": "dcm2niix", "Version": dcm2niix_version})
    for tool, version in sorted((tools or {}).items()):
        if tool != "dcm2niix":
            generated.append({"Name": tool, "Version": version})
    description: dict[str, Any] = {
        "Name": name,
        "BIDSVersion": load_entity_table().bids_version,
        "DatasetType": dataset_type,
        "GeneratedBy": generated,
    }
    if dataset_type == "derivative":
        description["SourceDatasets"] = [{"URL": "../../"}]
    return description


PARTICIPANT_COLUMNS = ("age", "sex", "label_source")  # after participant_id
PARTICIPANTS_JSON: dict[str, Any] = {
    "age": {
        "Description": "age of the participant at the first exported study, from PatientAge (0010,1010)",
        "Units": "year",
    },
    "sex": {
        "Description": "sex of the participant as recorded in PatientSex (0010,0040)",
        "Levels": {"M": "male", "F": "female", "O": "other"},
    },
    "label_source": {
        "Description": "what the participant label was derived from: the PatientID (a pseudonym"
        " after de-identification), or, when the PatientID was empty, punctuation only or a"
        " placeholder, the StudyInstanceUID (one label per study: unnamed patients never merge)",
    },
}


def _header_value(header: Mapping[str, Any], tag: str) -> Any:
    values = header.get(tag, {}).get("Value") or []
    return values[0] if values else None


def participant_info(stack: ExportStack) -> dict[str, str]:
    """`age` and `sex` from the stack's header (kept only if anonymization kept them)."""
    header = stack.summary.header
    info = {"age": "n/a", "sex": "n/a"}
    sex = _header_value(header, "00100040")
    if isinstance(sex, str) and sex.strip().upper() in ("M", "F", "O"):
        info["sex"] = sex.strip().upper()
    age = _header_value(header, "00101010")  # AS: nnnD/W/M/Y
    if isinstance(age, str) and len(age) == 4 and age[:3].isdigit():
        scale = {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}.get(age[3].upper())
        if scale:
            years = int(age[:3]) / scale
            info["age"] = str(int(years)) if age[3].upper() == "Y" else f"{years:.2f}"
    return info


def tsv(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return "\n".join("\t".join(r) for r in [list(header), *rows]) + "\n"


def sidecar_path(image: PurePosixPath) -> PurePosixPath:
    """The JSON sidecar of a NIfTI path."""
    return image.with_name(image.name.removesuffix(".gz").removesuffix(".nii") + ".json")


def _scan_record(exported: ExportedStack, image: PurePosixPath) -> ScanRecord:
    entities, suffix, _ = parse_bids_name(image.name)
    sidecar = exported.sidecars.get(str(sidecar_path(image)), {})
    direction = sidecar.get("PhaseEncodingDirection")
    return ScanRecord(
        path=image,
        subject=entities["sub"],
        session=entities.get("ses"),
        datatype=image.parent.name,
        suffix=suffix,
        entities=entities,
        acquired_at=exported.stack.acquired_at,
        slice_normal=slice_normal(exported.stack.summary.image_orientation),
        phase_axis=direction[0] if isinstance(direction, str) and direction else None,
    )


def _is_raw(path: PurePosixPath) -> bool:
    return path.parts[0] not in (DERIVATIVES.name, "sourcedata")


class SubjectPart(BaseModel):
    """What one subject adds to the dataset-level files (participants.tsv's row, the tools that
    converted its stacks, its `.bidsignore` patterns, ...): JSON-serializable, so an export can keep
    it and a later export of other subjects merge it without reading this subject's stacks again."""

    subject: str  # the `sub-` label
    subject_ids: list[str] = Field(default_factory=list)  # the catalog ids that give this label
    participant: dict[str, str] = Field(default_factory=dict)  # age, sex, label_source
    tools: dict[str, str] = Field(default_factory=dict)
    dcm2niix_version: str | None = None
    stacks: int = 0
    pipelines: list[str] = Field(default_factory=list)  # derivatives/<pipeline>/
    sourcedata: bool = False
    bidsignore: list[str] = Field(default_factory=list)
    incomplete: dict[str, list[str]] = Field(default_factory=dict)  # image path -> what it lacks


def subject_files(
    exports: Sequence[ExportedStack],
) -> tuple[dict[str, SubjectPart], dict[PurePosixPath, str]]:
    """Each subject's part of the dataset-level files, by label, and the files that live in the
    subjects' own folders: `sessions.tsv`, `scans.tsv` and the sidecars that field-map and M0
    links change (links never cross a subject). Pure; `bids` layout only."""
    by_subject: dict[str, list[ExportedStack]] = defaultdict(list)
    for exported in exports:
        by_subject[sanitize_label(exported.stack.subject)].append(exported)
    parts: dict[str, SubjectPart] = {}
    files: dict[PurePosixPath, str] = {}
    for subject, own in sorted(by_subject.items()):
        part, texts = _subject_part(subject, own)
        parts[subject] = part
        files.update(texts)
    return parts, files


def _subject_part(
    subject: str, exports: Sequence[ExportedStack]
) -> tuple[SubjectPart, dict[PurePosixPath, str]]:
    files: dict[PurePosixPath, str] = {}
    records, links, sidecars = _linked(exports)
    for image, additions in sorted(links.items()):
        path = sidecar_path(image)
        files[path] = json.dumps({**sidecars.get(str(path), {}), **additions}, indent=2) + "\n"
    incomplete = _incomplete(exports, records, links, sidecars)

    participant: dict[str, str] = {}
    sessions: dict[str, list[str]] = defaultdict(list)
    scans: dict[PurePosixPath, list[tuple[str, str]]] = defaultdict(list)
    # earliest acquisition first, so that age is the age at the first exported study
    for exported in sorted(
        exports, key=lambda e: (e.stack.acquired_at or datetime.max, str(e.base))
    ):
        stack = exported.stack
        info = participant_info(stack)
        info["label_source"] = subject_id_basis(stack.summary.subject_id)
        for column, value in info.items():
            if participant.get(column, "n/a") == "n/a":
                participant[column] = value
        acq_time = format_acq_time(
            stack.acquisition_date or stack.summary.study_date,
            stack.acquisition_time or stack.summary.acquisition_time,
        )
        for image in exported.images:
            if not _is_raw(image):
                continue
            session_dir = image.parent.parent
            scans[session_dir].append((image.relative_to(session_dir).as_posix(), acq_time))
            if stack.session:
                sessions[sanitize_label(stack.session)].append(acq_time)
    if sessions:
        session_rows = []
        for session, times in sorted(sessions.items()):
            known_times = sorted(t for t in times if t != "n/a")
            session_rows.append([f"ses-{session}", known_times[0] if known_times else "n/a"])
        files[PurePosixPath(f"sub-{subject}/sub-{subject}_sessions.tsv")] = tsv(
            ["session_id", "acq_time"], session_rows
        )
    for session_dir, scan_rows in sorted(scans.items()):
        prefix = "_".join(session_dir.parts)
        unique = sorted(dict(sorted(scan_rows, reverse=True)).items())  # one row per file
        files[session_dir / f"{prefix}_scans.tsv"] = tsv(["filename", "acq_time"], unique)

    versions = [e.tool_version for e in exports if e.tool == "dcm2niix" and e.tool_version]
    part = SubjectPart(
        subject=subject,
        subject_ids=sorted({e.stack.summary.subject_id for e in exports}),
        participant=participant,
        tools={e.tool: e.tool_version for e in exports if e.tool and e.tool_version},
        dcm2niix_version=versions[0] if versions else None,
        stacks=len(exports),
        pipelines=sorted({e.base.parts[1] for e in exports if e.base.parts[0] == DERIVATIVES.name}),
        sourcedata=any(e.base.parts[0] == "sourcedata" for e in exports)
        or any(f.parts[0] == "sourcedata" for e in exports for f in e.files),
        bidsignore=sorted(_bidsignore_patterns(exports, incomplete)),
        incomplete={str(p): list(m) for p, m in incomplete.items()},
    )
    return part, files


def merged_dataset_files(
    parts: Sequence[SubjectPart],
    *,
    name: str,
    dcm2niix_version: str | None = None,
    readme: str | None = None,
) -> dict[PurePosixPath, str]:
    """The files at the dataset's root (and each derivative pipeline's description), from every
    subject's part: the one writer of `participants.tsv`, whether the parts were computed in this
    export or carried from the previous one. Pure; `bids` layout only."""
    ordered = sorted(parts, key=lambda p: p.subject)
    tools: dict[str, str] = {}
    for part in ordered:
        tools.update(part.tools)
    if dcm2niix_version is None:
        dcm2niix_version = next((p.dcm2niix_version for p in ordered if p.dcm2niix_version), None)
    files: dict[PurePosixPath, str] = {}

    def put(relative: str | PurePosixPath, text: str) -> None:
        files[PurePosixPath(str(relative))] = text

    put(
        "dataset_description.json",
        json.dumps(
            dataset_description(name, dcm2niix_version=dcm2niix_version, tools=tools), indent=2
        )
        + "\n",
    )
    incomplete = {
        PurePosixPath(path): missing
        for part in ordered
        for path, missing in part.incomplete.items()
    }
    pipelines = sorted({p for part in ordered for p in part.pipelines})
    put(
        "README",
        readme
        or _readme_text(
            name,
            "bids",
            subjects=len(ordered),
            stacks=sum(p.stacks for p in ordered),
            pipelines=pipelines,
            sourcedata=any(p.sourcedata for p in ordered),
            incomplete=incomplete,
        ),
    )
    put(
        "participants.tsv",
        tsv(
            ["participant_id", "age", "sex", "label_source"],
            [
                [f"sub-{p.subject}", *(p.participant.get(c, "n/a") for c in PARTICIPANT_COLUMNS)]
                for p in ordered
            ],
        ),
    )
    put("participants.json", json.dumps(PARTICIPANTS_JSON, indent=2) + "\n")
    for pipeline in pipelines:
        description = dataset_description(
            f"{name} ({pipeline})",
            dcm2niix_version=dcm2niix_version,
            dataset_type="derivative",
            tools=tools,
        )
        put(
            DERIVATIVES / pipeline / "dataset_description.json",
            json.dumps(description, indent=2) + "\n",
        )
    put(
        ".bidsignore", "".join(f"{p}\n" for p in sorted({b for p in ordered for b in p.bidsignore}))
    )
    return files


def dataset_files(
    exports: Sequence[ExportedStack],
    *,
    name: str,
    dcm2niix_version: str | None,
    layout: str = "bids",
    readme: str | None = None,
) -> dict[PurePosixPath, str]:
    """The dataset-level files of an export, by path relative to the root, with their text.

    Includes the sidecars that field-map and M0 links change. Pure: computed from the
    `ExportedStack` records alone (each subject's files and part, `subject_files`, merged by
    `merged_dataset_files`). For the `flat` layout only `dataset_description.json` and `README`
    (a flat folder is not a BIDS dataset and is not validated).
    """
    if layout == "flat":
        tools = {e.tool: e.tool_version for e in exports if e.tool and e.tool_version}
        description = dataset_description(name, dcm2niix_version=dcm2niix_version, tools=tools)
        return {
            PurePosixPath("dataset_description.json"): json.dumps(description, indent=2) + "\n",
            PurePosixPath("README"): readme or _readme(name, exports, layout, {}),
        }
    parts, files = subject_files(exports)
    return {
        **merged_dataset_files(
            list(parts.values()), name=name, dcm2niix_version=dcm2niix_version, readme=readme
        ),
        **files,
    }


def _linked(
    exports: Sequence[ExportedStack],
) -> tuple[list[ScanRecord], dict[PurePosixPath, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The raw images, the sidecar keys the dataset adds to them by NIfTI path (field-map and M0
    links, M0Type) and every sidecar as converted."""
    raw = [(e, image) for e in exports for image in e.images if _is_raw(image)]
    records = [_scan_record(e, image) for e, image in raw]
    links = link_fieldmaps(records)
    for image, additions in link_m0scans(records).items():
        links.setdefault(image, {}).update(additions)
    sidecars = {path: content for e in exports for path, content in e.sidecars.items()}
    for image, additions in _m0_types(exports, records, links, sidecars).items():
        links.setdefault(image, {}).update(additions)
    return records, links, sidecars


def incomplete_images(exports: Sequence[ExportedStack]) -> dict[PurePosixPath, list[str]]:
    """Raw perf images BIDS cannot interpret as exported, with what they lack (see `_incomplete`)."""
    return _incomplete(exports, *_linked(exports))


def _aslcontext_path(image: PurePosixPath) -> PurePosixPath:
    stem = image.name.removesuffix(".gz").removesuffix(".nii").removesuffix("_asl")
    return image.with_name(f"{stem}_aslcontext.tsv")


def _m0_types(
    exports: Sequence[ExportedStack],
    records: Sequence[ScanRecord],
    links: Mapping[PurePosixPath, Mapping[str, Any]],
    sidecars: Mapping[str, Mapping[str, Any]],
) -> dict[PurePosixPath, dict[str, Any]]:
    """`M0Type` of ASL series whose own volumes hold no M0: `Separate` when an m0scan of the
    dataset is intended for it, `Absent` when none is and its volume types are known (the
    dataset then has no M0 for it). Unknown volume types leave it as the converter wrote it."""
    files = {f for e in exports for f in e.files}
    calibrated = {
        uri
        for image, additions in links.items()
        if image.name.endswith(("_m0scan.nii.gz", "_m0scan.nii"))
        for uri in additions.get("IntendedFor", [])
    }
    types: dict[PurePosixPath, dict[str, Any]] = {}
    for record in records:
        if record.datatype != "perf" or record.suffix != "asl":
            continue
        if "M0Type" in sidecars.get(str(sidecar_path(record.path)), {}):
            continue
        if bids_uri(record.path) in calibrated:
            types[record.path] = {"M0Type": "Separate"}
        elif _aslcontext_path(record.path) in files:
            types[record.path] = {"M0Type": "Absent"}
    return types


def _incomplete(
    exports: Sequence[ExportedStack],
    records: Sequence[ScanRecord],
    links: Mapping[PurePosixPath, Mapping[str, Any]],
    sidecars: Mapping[str, Mapping[str, Any]],
) -> dict[PurePosixPath, list[str]]:
    """Raw perf images that BIDS cannot interpret as exported, with what they lack: REQUIRED
    sidecar keys the DICOM does not record, `aslcontext.tsv`, or an m0scan's `IntendedFor` (no
    ASL series of its session was exported). They stay at their BIDS path, listed in `.bidsignore`
    and the README (ADR 0015)."""
    files = {f for e in exports for f in e.files}
    incomplete: dict[PurePosixPath, list[str]] = {}
    for record in records:
        if record.datatype != "perf" or record.suffix not in ("asl", "m0scan"):
            continue
        path = sidecar_path(record.path)
        sidecar = {**sidecars.get(str(path), {}), **links.get(record.path, {})}
        missing = missing_required(sidecar, record.suffix)
        if record.suffix == "asl" and _aslcontext_path(record.path) not in files:
            missing.append("aslcontext.tsv")
        if record.suffix == "m0scan" and "IntendedFor" not in sidecar:
            missing.append("IntendedFor")
        if missing:
            incomplete[record.path] = missing
    return incomplete


def write_dataset_files(
    root: Path,
    exports: Sequence[ExportedStack],
    *,
    name: str,
    dcm2niix_version: str | None,
    layout: str = "bids",
    readme: str | None = None,
) -> list[Path]:
    """Write `dataset_files(...)` under `root`; returns the files written."""
    written = []
    texts = dataset_files(
        exports, name=name, dcm2niix_version=dcm2niix_version, layout=layout, readme=readme
    )
    for relative, text in texts.items():
        path = root / str(relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, "utf-8")
        written.append(path)
    return written


def bidsignore(
    exports: Sequence[ExportedStack],
    incomplete: Mapping[PurePosixPath, Sequence[str]] | None = None,
) -> str:
    """Patterns for the raw files BIDS has no name for yet (e.g. `swi`, CT), and the files of the
    `incomplete` perf images (see `incomplete_perf`), so validation stays clean."""
    return "".join(f"{p}\n" for p in sorted(_bidsignore_patterns(exports, incomplete)))


def _bidsignore_patterns(
    exports: Sequence[ExportedStack],
    incomplete: Mapping[PurePosixPath, Sequence[str]] | None = None,
) -> set[str]:
    rules = load_naming_rules()
    patterns: set[str] = set()
    for image in incomplete or {}:
        patterns.add(image.as_posix())
        patterns.add(sidecar_path(image).as_posix())
        if image.name.endswith(("_asl.nii.gz", "_asl.nii")):
            patterns.add(_aslcontext_path(image).as_posix())
    for exported in exports:
        for image in exported.images:
            if not _is_raw(image):
                continue
            datatype = image.parent.name
            _, suffix, _ = parse_bids_name(image.name)
            if datatype not in rules.raw_suffixes:
                patterns.add(f"**/{datatype}")  # the folder itself: the validator skips its files
            elif not rules.is_standard(datatype, suffix):
                patterns.add(f"*_{suffix}.*")
    return patterns


def _readme(
    name: str,
    exports: Sequence[ExportedStack],
    layout: str,
    incomplete: Mapping[PurePosixPath, Sequence[str]],
) -> str:
    return _readme_text(
        name,
        layout,
        subjects=len({sanitize_label(e.stack.subject) for e in exports}),
        stacks=len(exports),
        pipelines=sorted({e.base.parts[1] for e in exports if e.base.parts[0] == DERIVATIVES.name}),
        sourcedata=any(e.base.parts[0] == "sourcedata" for e in exports)
        or any(f.parts[0] == "sourcedata" for e in exports for f in e.files),
        incomplete=incomplete,
    )


def _readme_text(
    name: str,
    layout: str,
    *,
    subjects: int,
    stacks: int,
    pipelines: Sequence[str],
    sourcedata: bool,
    incomplete: Mapping[PurePosixPath, Sequence[str]],
) -> str:
    lines = [
        f"# {name}",
        "",
        f"Exported by Cohortflow {cohortflow_version()} from DICOM ({layout} layout): "
        f"{subjects} subject(s), {stacks} series stack(s).",
        "Images were converted with dcm2niix (dicom2nifti where dcm2niix failed; the sidecar's "
        "ConversionSoftware says which). Dates are as stored after de-identification: when study "
        "dates were shifted, acq_time values are shifted by the same per-subject offset.",
    ]
    if pipelines:
        lines += [
            "",
            "Scanner-generated maps are kept apart under "
            + ", ".join(f"derivatives/{p}/" for p in pipelines)
            + ".",
        ]
    if sourcedata:
        lines += [
            "",
            "sourcedata/dicom/ holds the DICOM instances of each exported stack (de-identified when the cohort was anonymized).",
        ]
    if incomplete:
        lines += [
            "",
            "These perfusion images lack what BIDS requires to interpret them and the DICOM does "
            "not record; they are listed in .bidsignore until the values are added by hand:",
            *(f"- {p}: {', '.join(missing)}" for p, missing in sorted(incomplete.items())),
        ]
    return "\n".join(lines) + "\n"
