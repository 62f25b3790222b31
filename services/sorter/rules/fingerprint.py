"""Stack fingerprints: the flat, typed features the classifier reads, built from a `StackSummary`.

A fingerprint keeps the raw values (for evidence and review) and a set of namespaced feature tokens
(`features`) that rules match against with set operations only:

    it:<ImageType/FrameType value>      ss:<ScanningSequence>   sv:<SequenceVariant>
    so:<ScanOptions>                    seq:<sequence-name root> seqdim:<2d|3d>   psd:<GE/Philips name>
    acq:<MRAcquisitionType>             ac:<AcquisitionContrast> eps:<EchoPulseSequence>
    ir:<InversionRecovery>              epi:<EchoPlanarPulseSequence> cic:<ComplexImageComponent>
    pat:<ParallelAcquisitionTechnique>  pf:yes  fatsup:<SpectrallySelectedSuppression>
    vendor:<name>  kind:<object kind>   mod:<Modality>  txt:<word>  body:<word>
    phys:<derived physics fact>         ct:<CT fact>   pet:<PET fact>

Physics facts (`phys:multi_echo`, `phys:b_high`, `phys:many_volumes`, ...) are computed here once so
that the rule packs stay declarative. See `FINGERPRINT_VERSION` for when stored fingerprints go stale.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

from services.sorter.rules.header import (
    Flat,
    all_float,
    all_str,
    first_float,
    first_str,
    flatten_header,
    tag_key,
    to_float,
)
from services.sorter.rules.text import tokenize
from services.sorter.rules.vocabulary import vocabulary
from shared.catalog import StackSummary

FINGERPRINT_SCHEMA = 2


def fingerprint_version() -> str:
    """Schema of the record plus the version of the vocabulary it was built with."""
    return f"fp{FINGERPRINT_SCHEMA}.{vocabulary().version}"


# tags read by keyword, resolved once
_K = {
    name: tag_key(name)
    for name in (
        [
            "Modality",
            "SOPClassUID",
            "Manufacturer",
            "ManufacturerModelName",
            "SeriesDescription",
            "ProtocolName",
            "SequenceName",
            "PulseSequenceName",
            "ImageType",
            "FrameType",
            "ScanningSequence",
            "SequenceVariant",
            "ScanOptions",
            "MRAcquisitionType",
            "RepetitionTime",
            "EchoTime",
            "EffectiveEchoTime",
            "InversionTime",
            "FlipAngle",
            "EchoTrainLength",
            "EchoNumbers",
            "MagneticFieldStrength",
            "AcquisitionContrast",
            "EchoPulseSequence",
            "InversionRecovery",
            "EchoPlanarPulseSequence",
            "ComplexImageComponent",
            "ParallelAcquisitionTechnique",
            "ParallelAcquisition",
            "PartialFourier",
            "SpectrallySelectedSuppression",
            "MagnetizationTransfer",
            "TimeOfFlightContrast",
            "PhaseContrast",
            "AngioFlag",
            "DiffusionBValue",
            "DiffusionDirectionality",
            "ContrastBolusAgent",
            "ContrastBolusIngredient",
            "ContrastBolusVolume",
            "ContrastBolusStartTime",
            "ContrastBolusAgentSequence",
            "BodyPartExamined",
            "ImageOrientationPatient",
            "PixelSpacing",
            "Rows",
            "Columns",
            "SliceThickness",
            "NumberOfTemporalPositions",
            "KVP",
            "ConvolutionKernel",
            "FilterType",
            "ExposureTime",
            "XRayTubeCurrent",
            "ScanOptions",
            "Radiopharmaceutical",
            "RadionuclideTotalDose",
            "CorrectedImage",
            "AttenuationCorrectionMethod",
            "Units",
            "DecayCorrection",
            "ReconstructionMethod",
            "SeriesType",
            "InPlanePhaseEncodingDirection",
            "SmallestImagePixelValue",
            "PixelRepresentation",
            "ImageComments",
            "StudyDescription",
            "NumberOfFrames",
            "ParallelReductionFactorInPlane",
            "MultibandFactor",
            "ParallelReductionFactorOutOfPlane",
            "ArterialSpinLabelingContrast",
            "ASLContext",
            "ASLPulseTrainDuration",
        ]
    )
    if name not in {"MultibandFactor"}
}
_RADIOPHARM_SEQ_CODE = tag_key("RadiopharmaceuticalInformationSequence")
_GE_VAS = tag_key("0043,1030")
_SEQ_NAME = re.compile(r"^\*?([a-z_]+)(\d+d)?(\d*)(.*)$")
_NON_WORD = re.compile(r"[^a-z0-9]+")


@dataclass(slots=True)
class Fingerprint:
    """The classification features of one stack (flat; every field has a fixed type)."""

    stack_key: str
    series_instance_uid: str = ""
    kind: str = "unknown"  # object kind from SOP class / modality: mr, enhanced_mr, ct, pet, ...
    modality: str = ""
    vendor: str = "unknown"
    manufacturer: str = ""
    model: str = ""
    description: str = ""
    protocol: str = ""
    sequence_name: str = ""  # SequenceName / PulseSequenceName / vendor private name, raw
    text_tokens: frozenset[str] = frozenset()
    image_type: frozenset[str] = frozenset()
    scanning_sequence: frozenset[str] = frozenset()
    sequence_variant: frozenset[str] = frozenset()
    scan_options: frozenset[str] = frozenset()
    mr_acquisition_type: str = ""
    acquisition_contrast: str = ""
    echo_pulse_sequence: str = ""
    inversion_recovery: str = ""
    part: str = ""  # the extractor's PART constant: M, P, R, I or a derived map (B0MAP, ADC, ...)
    complex_component: str = ""
    parallel_technique: str = ""
    tr: float | None = None
    te: float | None = None
    ti: float | None = None
    flip_angle: float | None = None
    etl: float | None = None
    echo_number: int | None = None
    field_strength: float | None = None
    echo_times: tuple[float, ...] = ()
    inversion_times: tuple[float, ...] = ()
    b_values: tuple[float, ...] = ()
    n_diffusion_directions: int = 0
    n_volumes: int = 0
    n_timepoints: int = (
        0  # volumes of the whole run as the protocol states it (excerpts have fewer)
    )
    sequence_file: str = ""  # Siemens tSequenceFileName (CSA ASCCONV), e.g. "ep2d_pcasl"
    n_slices: int = 0
    n_instances: int = 0
    orientation: str = ""  # AX, SAG, COR, OBL
    fov_mm: float | None = None
    aspect: float | None = None
    slice_thickness: float | None = None
    contrast_agent: str = ""
    body_part: str = ""
    kvp: float | None = None
    ct_kernel: str = ""
    pet_tracer: str = ""
    pet_units: str = ""
    pet_corrections: frozenset[str] = frozenset()
    features: frozenset[str] = field(default_factory=frozenset)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (sets as sorted lists) for the `sorting.stack_fingerprint` row."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, frozenset):
                out[key] = sorted(value)
            elif isinstance(value, tuple):
                out[key] = list(value)
        return out


def orientation_label(iop: list[float]) -> str:
    """AX/SAG/COR from ImageOrientationPatient (0020,0037): the axis of the slice normal.

    OBL when the normal is more than ~30 degrees off every axis.
    """
    if len(iop) != 6:
        return ""
    rx, ry, rz, cx, cy, cz = iop
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    axis = max(range(3), key=lambda i: abs(normal[i]))
    if abs(normal[axis]) < 0.85:
        return "OBL"
    return ("SAG", "COR", "AX")[axis]


def _words(values: Iterable[str]) -> frozenset[str]:
    return _words_of(tuple(values))


@lru_cache(maxsize=16384)
def _words_of(values: tuple[str, ...]) -> frozenset[str]:
    return frozenset(v.strip().lower() for v in values if v and v.strip())


@lru_cache(maxsize=8192)
def _sequence_tokens(name: str) -> tuple[str, ...]:
    """Siemens-style sequence names: '*tfl3d1_16ns' -> seq:tfl seqdim:3d; '*ep_b1000#12' -> seq:ep_b."""
    out: list[str] = []
    lowered = name.strip().lower()
    if not lowered:
        return ()
    match = _SEQ_NAME.match(lowered)
    if match:
        root, dim, _, rest = match.groups()
        out.append(f"seq:{root.strip('_')}")
        if dim:
            out.append(f"seqdim:{dim}")
        # suffix parts: '*fl3d1r_t70' -> seqsfx:r, seqsfx:t (TOF ramp); '*tfl3d1_16ns' -> seqsfx:ns
        for part in re.split(r"[_#]", rest):
            letters = part.strip("0123456789")
            if letters.isalpha():
                out.append(f"seqsfx:{letters}")
    out.append(f"seqname:{_NON_WORD.sub('', lowered)}")
    return tuple(out)


@lru_cache(maxsize=512)
def _private_keys(vendor: str, meaning: str) -> tuple[str, ...]:
    """The tags that carry `meaning` for `vendor` (most vendors have none for most meanings)."""
    return tuple(key for owner, key in vocabulary().private.get(meaning, []) if owner == vendor)


def _private(flat: Flat, vendor: str, meaning: str) -> list[Any]:
    for key in _private_keys(vendor, meaning):
        found = flat.get(key)
        if found is not None:
            return found
    return []


def _ge_b_value(raw: Any) -> float | None:
    """GE (0043,1039) first value is b; large values carry a 1e9 offset (dcm2niix nii_dicom.cpp)."""
    value = to_float(raw)
    if value is None:
        return None
    return value % 1_000_000_000 if value >= 1_000_000_000 else value


def _b_values(stack: StackSummary, flat: Flat, vendor: str) -> tuple[float, ...]:
    """The stack's b-values: the extractor's per-frame values when it found any (they cover every
    frame), else the representative header's standard or vendor private value."""
    if stack.b_values:
        return tuple(sorted(set(stack.b_values)))
    found: set[float] = set()
    standard = first_float(flat, _K["DiffusionBValue"])
    if standard is not None:
        found.add(standard)
    private = _private(flat, vendor, "b_value")
    if private:
        value = _ge_b_value(private[0]) if vendor == "ge" else to_float(private[0])
        if value is not None:
            found.add(value)
    return tuple(sorted(found))


def _physics(fp: Fingerprint) -> list[str]:
    """Physics facts as feature tokens. Thresholds are conventional MR values, not vendor ones."""
    facts: list[str] = []
    b = fp.b_values
    b_max = max(b) if b else 0.0
    if b_max >= 50:
        facts.append("phys:b_nonzero")
    if b_max >= 400:
        facts.append("phys:b_high")
    if b and b_max < 50:
        facts.append("phys:b_zero_only")
    if fp.n_diffusion_directions >= 6:
        facts.append("phys:dti_dirs")
    if len(fp.echo_times) >= 2:
        facts.append("phys:multi_echo")
    if len(fp.echo_times) >= 3:
        facts.append("phys:many_echoes")
    if len(fp.inversion_times) >= 2:
        facts.append("phys:multi_ti")
    volumes = max(fp.n_volumes, fp.n_timepoints)
    if volumes >= 10:
        facts.append("phys:many_volumes")
    if volumes >= 2:
        facts.append("phys:dynamic")
    if fp.te is not None and fp.te >= 60:
        facts.append("phys:te_ge60")  # spin-echo EPI / diffusion range; GRE-EPI BOLD is 25-50 ms
    tr, te, ti, fa = fp.tr, fp.te, fp.ti, fp.flip_angle
    if ti is not None and ti > 0:
        facts.append("phys:ti")
        if ti >= 1500:
            facts.append("phys:ti_long")  # fluid nulling (FLAIR) range at 1.5-3 T
        elif ti <= 250:
            facts.append("phys:ti_short")  # fat nulling (STIR) range
        else:
            facts.append("phys:ti_mid")  # T1 preparation (MPRAGE 800-1100, IR-SPGR 300-600)
    if tr is not None and te is not None:
        if tr >= 1500 and te >= 60:
            facts.append("phys:long_tr_long_te")  # T2-weighted spin echo
        if tr >= 1500 and te <= 40:
            facts.append("phys:long_tr_short_te")  # proton density (SE) or EPI/3D-TSE
        if tr <= 900 and te <= 30:
            facts.append("phys:short_tr_short_te")  # T1-weighted SE / spoiled GRE
        if te >= 15 and tr >= 20:
            facts.append("phys:te_long_gre")  # T2* range for GRE
    if fa is not None:
        if fa <= 20:
            facts.append("phys:fa_low")
        if fa >= 60:
            facts.append("phys:fa_high")
    if fp.slice_thickness is not None and fp.slice_thickness <= 1.5:
        facts.append("phys:thin")
    if fp.n_slices and fp.n_slices <= 5 and fp.n_volumes <= 1:
        facts.append("phys:few_slices")
    return facts


_PART_COMPONENT = {"M": "MAGNITUDE", "P": "PHASE", "R": "REAL", "I": "IMAGINARY"}
_COMPONENTS = frozenset({"MAGNITUDE", "PHASE", "REAL", "IMAGINARY", "MIXED"})


def _complex_component(stack: StackSummary, flat: Flat) -> str:
    """ComplexImageComponent (0008,9208) of the stack: from the extractor's PART constant (M, P, R,
    I or the full word), else from the header (Enhanced objects)."""
    part = str(stack.constants.get("PART") or "").upper()
    if part in _PART_COMPONENT:
        return _PART_COMPONENT[part]
    if part in _COMPONENTS:
        return part
    return first_str(flat, _K["ComplexImageComponent"]).upper()


def _orientation(stack: StackSummary, flat: Flat) -> str:
    iop = [float(v) for v in stack.image_orientation] or all_float(
        flat, _K["ImageOrientationPatient"]
    )
    return orientation_label(iop)


def fingerprint(stack: StackSummary) -> Fingerprint:
    """Build the fingerprint of one stack from its summary and representative header."""
    vocab = vocabulary()
    flat = flatten_header(stack.header)
    modality = (stack.modality or first_str(flat, _K["Modality"])).upper()
    sop = stack.sop_class_uid or first_str(flat, _K["SOPClassUID"])
    kind = vocab.sop_kinds.get(sop) or vocab.modality_kinds.get(modality, "unknown")
    manufacturer = stack.manufacturer or first_str(flat, _K["Manufacturer"])
    vendor = vocab.vendor(manufacturer)
    description = stack.series_description or first_str(flat, _K["SeriesDescription"])
    protocol = stack.protocol_name or first_str(flat, _K["ProtocolName"])

    te = to_float(stack.constants.get("TE"))
    if te is None:
        te = first_float(flat, _K["EchoTime"])
        if te is None:
            te = first_float(flat, _K["EffectiveEchoTime"])
    ti = to_float(stack.constants.get("TI"))
    if ti is None:
        ti = first_float(flat, _K["InversionTime"])
    fov, aspect = _geometry(stack, flat)
    echo_number = to_float(stack.constants.get("ECHO")) or first_float(flat, _K["EchoNumbers"])
    fp = Fingerprint(
        stack_key=stack.stack_key,
        series_instance_uid=stack.series_instance_uid,
        kind=kind,
        modality=modality,
        vendor=vendor,
        manufacturer=manufacturer,
        model=stack.manufacturer_model or first_str(flat, _K["ManufacturerModelName"]),
        description=description,
        protocol=protocol,
        sequence_name=_sequence_names(flat, vendor),
        text_tokens=tokenize(description) | tokenize(protocol),
        image_type=_image_type(stack, flat),
        scanning_sequence=_words(all_str(flat, _K["ScanningSequence"])),
        sequence_variant=_words(all_str(flat, _K["SequenceVariant"])),
        scan_options=_words(all_str(flat, _K["ScanOptions"])),
        mr_acquisition_type=first_str(flat, _K["MRAcquisitionType"]).upper(),
        acquisition_contrast=first_str(flat, _K["AcquisitionContrast"]).upper(),
        echo_pulse_sequence=first_str(flat, _K["EchoPulseSequence"]).upper(),
        inversion_recovery=first_str(flat, _K["InversionRecovery"]).upper(),
        part=str(stack.constants.get("PART") or "").upper(),
        complex_component=_complex_component(stack, flat),
        parallel_technique=first_str(flat, _K["ParallelAcquisitionTechnique"]).upper(),
        tr=first_float(flat, _K["RepetitionTime"]),
        te=te,
        ti=ti,
        flip_angle=to_float(stack.constants.get("FA")) or first_float(flat, _K["FlipAngle"]),
        etl=first_float(flat, _K["EchoTrainLength"]),
        echo_number=int(echo_number) if echo_number is not None else None,
        field_strength=_field_strength(flat),
        echo_times=tuple(sorted({round(t, 3) for t in stack.echo_times})),
        inversion_times=tuple(sorted({round(t, 1) for t in stack.inversion_times})),
        n_diffusion_directions=stack.n_diffusion_directions,
        n_volumes=stack.n_volumes,
        n_slices=stack.n_slices,
        n_instances=stack.n_instances,
        orientation=str(stack.constants.get("ORIENT", "")) or _orientation(stack, flat),
        fov_mm=fov,
        aspect=aspect,
        slice_thickness=stack.slice_thickness or first_float(flat, _K["SliceThickness"]),
        contrast_agent=_contrast_agent(stack, flat),
        body_part=first_str(flat, _K["BodyPartExamined"]),
        kvp=first_float(flat, _K["KVP"]),
        ct_kernel=" ".join(all_str(flat, _K["ConvolutionKernel"])),
        pet_tracer=_pet_tracer(stack, flat),
        pet_units=first_str(flat, _K["Units"]),
        pet_corrections=_words(all_str(flat, _K["CorrectedImage"])),
    )
    fp.b_values = _b_values(stack, flat, vendor)
    if vendor == "siemens":
        fp.sequence_file, repetitions = _siemens_protocol(stack.header)
    else:
        repetitions = 0
    temporal = first_float(flat, _K["NumberOfTemporalPositions"]) or 0
    fp.n_timepoints = max(int(temporal), repetitions)
    fp.features = _features(fp, flat)
    return fp


def _siemens_protocol(header: dict[str, Any]) -> tuple[str, int]:
    """(sequence file name, volumes of the run) from the `Ascconv` member the extractor keeps on the
    CSA Series Header element (0029,xx20) of the "SIEMENS CSA HEADER" block: `%SiemensSeq%\\ep2d_pasl`
    -> "ep2d_pasl"; lRepetitions counts repetitions after the first."""
    for block in range(0x10, 0x20):
        creator = header.get(f"002900{block:02X}")
        if creator is None:
            return "", 0  # private creators are allotted from 0x10 upwards without gaps
        element = header.get(f"0029{block:02X}20")
        if isinstance(element, dict) and "Ascconv" in element:
            values = element["Ascconv"]
            name = str(values.get("tSequenceFileName", "")).replace("\\", "/").rsplit("/", 1)[-1]
            repetitions = to_float(values.get("lRepetitions"))
            return name.strip().lower(), int(repetitions) + 1 if repetitions is not None else 0
    return "", 0


def _sequence_names(flat: Flat, vendor: str) -> str:
    """SequenceName (0018,0024), PulseSequenceName (0018,9005) and the vendor's private name."""
    names = [first_str(flat, _K["SequenceName"]), first_str(flat, _K["PulseSequenceName"])]
    private = _private(flat, vendor, "sequence_name")
    if private:
        names.append(str(private[0]).strip())
    return " ".join(n for n in names if n)


def _image_type(stack: StackSummary, flat: Flat) -> frozenset[str]:
    """ImageType (0008,0008) values of the whole stack, plus the Enhanced FrameType (0008,9007)."""
    return _words(
        [
            *(part for joined in stack.image_types for part in joined.split("\\")),
            *all_str(flat, _K["ImageType"]),
            *all_str(flat, _K["FrameType"]),
        ]
    )


def _geometry(stack: StackSummary, flat: Flat) -> tuple[float | None, float | None]:
    """(field of view along rows in mm, rows/columns aspect) from Rows, Columns, PixelSpacing."""
    rows = stack.rows or first_float(flat, _K["Rows"])
    cols = stack.columns or first_float(flat, _K["Columns"])
    spacing = [float(v) for v in stack.pixel_spacing] or all_float(flat, _K["PixelSpacing"])
    fov = rows * spacing[0] if rows and spacing else None
    return fov, (rows / cols) if rows and cols else None


def _field_strength(flat: Flat) -> float | None:
    """MagneticFieldStrength (0018,0087) in tesla; some scanners write gauss (15000 = 1.5 T)."""
    value = first_float(flat, _K["MagneticFieldStrength"])
    return value / 10000.0 if value is not None and value > 100 else value


def _contrast_agent(stack: StackSummary, flat: Flat) -> str:
    """ContrastBolusAgent (0018,0010) or ContrastBolusIngredient (0018,1048); a coded agent
    (ContrastBolusAgentSequence, 0018,0012) without text still counts as an agent."""
    agent = first_str(flat, _K["ContrastBolusAgent"]) or first_str(
        flat, _K["ContrastBolusIngredient"]
    )
    if not agent and _K["ContrastBolusAgentSequence"] in stack.header:
        return "contrast agent (coded)"
    return agent


def _pet_tracer(stack: StackSummary, flat: Flat) -> str:
    """Radiopharmaceutical (0018,0031), top level or inside the Radiopharmaceutical Information
    Sequence (0054,0016) where PET objects keep it."""
    tracer = first_str(flat, _K["Radiopharmaceutical"])
    if not tracer and _RADIOPHARM_SEQ_CODE in stack.header:
        items = stack.header[_RADIOPHARM_SEQ_CODE].get("Value") or [{}]
        tracer = first_str(flatten_header(items[0]), _K["Radiopharmaceutical"])
    return tracer


@lru_cache(maxsize=65536)
def _prefixed(prefix: str, tokens: frozenset[str]) -> frozenset[str]:
    """{'t1', 'mprage'} -> {'txt:t1', 'txt:mprage'}, cached: cohorts repeat the same token sets."""
    return frozenset(f"{prefix}:{t}" for t in tokens)


# echo-planar readout: ScanningSequence EP (PS3.3 C.8.3.1), EchoPlanarPulseSequence YES (C.8.13.5.9),
# Siemens sequence roots (*epfid, *epse, *ep_b, *re_b), or "epi" inside a GE/Philips/UIH sequence name
# (GE epi/epiRT/epi2, Philips FEEPI/SEEPI, UIH epi_*) or a Siemens ep2d_/ep3d_ sequence file
_EPI_TOKENS = frozenset(
    {"ss:ep", "epi:yes", "seq:epfid", "seq:epse", "seq:ep_b", "seq:re_b", "seq:ep"}
)
# Siemens product and C2P ASL sequence files (dcm2niix nii_dicom_batch.cpp checks the same names):
# ep2d_pasl, tgse_pasl, ep2d_pcasl(_UI_PHC), tgse_pcasl, ep2d_fairest, to_ep2d_VEPCASL, ...
_ASL_FILE = re.compile(r"p?c?asl|fairest")
_EPI_NAME = re.compile(r"epi|\bep2d|\bep3d")


@lru_cache(maxsize=8192)
def _epi_name(sequence_name: str, sequence_file: str) -> bool:
    return _EPI_NAME.search(f"{sequence_name.lower()} {sequence_file}") is not None


_CODED_FLAGS = (
    ("EchoPlanarPulseSequence", "epi"),
    ("PartialFourier", "pf"),
    ("SpectrallySelectedSuppression", "fatsup"),
    ("MagnetizationTransfer", "mt"),
    ("TimeOfFlightContrast", "tof"),
    ("PhaseContrast", "pc"),
    ("AngioFlag", "angio"),
    ("ParallelAcquisition", "pa"),
    ("DiffusionDirectionality", "diffdir"),
    (
        "ArterialSpinLabelingContrast",
        "aslc",
    ),  # PS3.3 C.8.13.5.14: CONTINUOUS, PSEUDOCONTINUOUS, PULSED
    ("ASLContext", "aslctx"),  # PS3.3 C.8.13.5.14: CONTROL, LABEL, M_ZERO_SCAN
)
_CODED_FLAG_KEYS = tuple((_K[keyword], prefix) for keyword, prefix in _CODED_FLAGS)


def _features(fp: Fingerprint, flat: Flat) -> frozenset[str]:
    out = {f"kind:{fp.kind}", f"mod:{fp.modality.lower()}", f"vendor:{fp.vendor}"}
    out |= _prefixed("it", fp.image_type)
    out |= _prefixed("ss", fp.scanning_sequence)
    out |= _prefixed("sv", fp.sequence_variant)
    out |= _prefixed("so", fp.scan_options)
    out |= _prefixed("txt", fp.text_tokens)
    for name in fp.sequence_name.split():
        out.update(_sequence_tokens(name))
    if fp.sequence_file:
        out.add(f"sfn:{fp.sequence_file}")
        if _ASL_FILE.search(fp.sequence_file):
            out.add("sfn:asl")  # an arterial-spin-labelling sequence binary
    if not _EPI_TOKENS.isdisjoint(out) or _epi_name(fp.sequence_name, fp.sequence_file):
        out.add("phys:epi")  # an echo-planar readout, whoever says so
    for value, prefix in (
        (fp.mr_acquisition_type, "acq"),
        (fp.acquisition_contrast, "ac"),
        (fp.echo_pulse_sequence, "eps"),
        (fp.inversion_recovery, "ir"),
        (fp.complex_component, "cic"),
        (fp.part, "part"),
        (fp.parallel_technique, "pat"),
        (fp.orientation, "orient"),
    ):
        if value:
            out.add(f"{prefix}:{value.lower()}")
    for key, prefix in _CODED_FLAG_KEYS:
        values = flat.get(key)
        if values and values[0] is not None:
            value = str(values[0]).strip()
            if value:
                out.add(f"{prefix}:{value.lower()}")
    if _K["ASLPulseTrainDuration"] in flat:
        out.add(
            "asl:pulse_train"
        )  # (0018,9258): only ASL acquisitions have a labelling pulse train
    asl_technique = _private(flat, fp.vendor, "asl_contrast")
    if asl_technique:
        out.add(f"aslc:{str(asl_technique[0]).strip().lower()}")
    label_type = _private(flat, fp.vendor, "asl_label")
    if label_type:
        out.add(f"asllabel:{str(label_type[0]).strip().lower()}")
    kind_values = _private(flat, fp.vendor, "image_kind")
    if kind_values:
        out.add(f"vimg:{str(kind_values[0]).strip().lower()}")
    vas = flat.get(_GE_VAS) if fp.vendor == "ge" else None
    if vas:
        out.add(f"gevas:{str(vas[0]).strip()}")
    smallest = first_float(flat, _K["SmallestImagePixelValue"])
    if smallest is not None and smallest < 0:
        out.add("phys:signed_values")  # a magnitude image is never negative
    if fp.body_part:
        out |= _prefixed("body", tokenize(fp.body_part))
    if fp.contrast_agent:
        out.add("contrast:agent")
    if fp.kvp is not None:
        out.add("ct:kvp")
    if fp.ct_kernel:
        out |= _prefixed("ctk", tokenize(fp.ct_kernel))
    if fp.modality == "CT":
        out |= _prefixed("ctscan", fp.scan_options)
    if fp.pet_tracer:
        out |= _prefixed("tracer", tokenize(fp.pet_tracer))
    out |= _prefixed("petcorr", fp.pet_corrections)
    if fp.pet_units:
        out.add(f"petunits:{fp.pet_units.lower()}")
    out.update(_physics(fp))
    return frozenset(out)


def fingerprint_batch(stacks: Iterable[StackSummary]) -> list[Fingerprint]:
    """Fingerprints of many stacks. Text, vendor and sequence-name parsing are cached per distinct
    string, so a cohort's repeated protocols cost a dictionary lookup after their first stack."""
    return [fingerprint(stack) for stack in stacks]
