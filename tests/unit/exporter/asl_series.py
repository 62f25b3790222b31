"""ASL test series built from a real Siemens mosaic EPI: the headers an ASL acquisition carries,
the pixels of the real EPI volumes (no ASL DICOM is in the team's data).

`write_asl_series` copies one real mosaic file per volume and rewrites what an ASL series records:
the Siemens protocol (ASCCONV in the CSA series header (0029,1020): `tSequenceFileName` and the
`sWipMemBlock` fields dcm2niix reads for pCASL), ImageType, and optionally the standard per-frame
ASL attributes of the enhanced MR IOD placed per instance (ASL Context (0018,9257), Arterial Spin
Labeling Contrast (0018,9250), ASL Pulse Train Duration (0018,9258), ASL Crusher Flag (0018,9259)).
Everything is written into a temporary folder; nothing binary is kept in the repository.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

# one real mosaic EPI volume per file (Siemens Skyra, syngo MR E11, 2 volumes)
SOURCE = ("dcm_qa_nih", "In", "20180918Si", "mr_0003")

PCASL_PROTOCOL = {
    # Siemens C2P pCASL (Wang): dcm2niix reads labelling distance (mm), post-labelling delay (us),
    # the number of RF blocks (labelling duration = blocks x 18.4 ms) and the RF gap (us)
    "tSequenceFileName": '""%CustomerSeq%\\ep2d_pcasl_UI_PHC""',
    "sWipMemBlock.adFree[1]": "90",
    "sWipMemBlock.adFree[2]": "1800000",
    "sWipMemBlock.adFree[3]": "80",
    "sWipMemBlock.adFree[4]": "360",
}
M0_PROTOCOL = {"tSequenceFileName": '""%CustomerSeq%\\ep2d_pcasl_UI_PHC""'}


def _csa_items(blob: bytes) -> list[tuple[int, int]]:
    """(offset of the item's 16-byte header, data length) of every item of a CSA2 ("SV10") blob."""
    if blob[:4] != b"SV10":
        raise ValueError("not a CSA2 header")
    n_tags = struct.unpack_from("<I", blob, 8)[0]
    pos, items = 16, []
    for _ in range(n_tags):
        n_items = struct.unpack_from("<i", blob, pos + 64 + 4 + 4 + 4)[0]
        pos += 84
        for _ in range(n_items):
            length = struct.unpack_from("<4i", blob, pos)[1]
            items.append((pos, length))
            pos += 16 + length + (-length % 4)
    return items


def rewrite_ascconv(blob: bytes, edits: Mapping[str, str]) -> bytes:
    """The CSA series header with ASCCONV lines replaced (or appended) by `edits` (key -> value)."""
    for header, length in _csa_items(blob):
        data = blob[header + 16 : header + 16 + length]
        begin, end = data.find(b"### ASCCONV BEGIN"), data.find(b"### ASCCONV END")
        if begin < 0 or end < 0:
            continue
        lines = data[begin:end].decode("latin-1").split("\n")
        pending = dict(edits)
        for i, line in enumerate(lines):
            key = line.split("=", 1)[0].strip()
            if key in pending:
                lines[i] = f"{key}\t = \t{pending.pop(key)}"
        lines[-1:-1] = [f"{k}\t = \t{v}" for k, v in pending.items()]
        text = data[:begin] + "\n".join(lines).encode("latin-1") + data[end:]
        size = len(text)
        item = struct.pack("<4i", size, size, 77, size) + text + b"\0" * (-size % 4)
        old_end = header + 16 + length + (-length % 4)
        return blob[:header] + item + blob[old_end:]
    raise ValueError("no ASCCONV protocol in the CSA header")


def write_asl_series(
    dicom_root: Path,
    target: Path,
    *,
    volumes: Sequence[str],
    description: str = "ep2d_pcasl",
    protocol: Mapping[str, str] = PCASL_PROTOCOL,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "ASL", "NONE", "ND", "MOSAIC"),
    standard_attributes: bool = False,
    series_number: int = 10,
    study_uid: str | None = None,
) -> list[Path]:
    """Write one ASL series: a mosaic file per entry of `volumes` ("CONTROL", "LABEL",
    "M_ZERO_SCAN"), in acquisition order. With `standard_attributes` each instance carries its ASL
    Context and the series' labelling attributes; without them only the Siemens protocol says ASL."""
    sources = sorted(dicom_root.joinpath(*SOURCE).glob("*.dcm"))
    series_uid = generate_uid()
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for index, context in enumerate(volumes):
        ds = pydicom.dcmread(sources[index % len(sources)])
        ds.SeriesInstanceUID = series_uid
        if study_uid:
            ds.StudyInstanceUID = study_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber = series_number
        ds.SeriesDescription = ds.ProtocolName = description
        ds.InstanceNumber = ds.AcquisitionNumber = index + 1
        seconds = 12 * 3600 + 30 * 60 + index * 4
        ds.AcquisitionTime = (
            f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}.000000"
        )
        ds.ImageType = list(image_type)
        ds[0x0029, 0x1020].value = rewrite_ascconv(ds[0x0029, 0x1020].value, protocol)
        if standard_attributes:
            ds.ArterialSpinLabelingContrast = "PSEUDOCONTINUOUS"
            ds.ASLContext = context
            ds.ASLPulseTrainDuration = 1472  # ms, the C2P protocol's 80 RF blocks x 18.4 ms
            ds.ASLCrusherFlag = "NO"
        path = target / f"IM{index + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


# Siemens XA10 enhanced MR: one multi-frame file per volume (6 slices), 4 volumes
ENHANCED_SOURCE = ("dcm_qa_enh", "In", "Siemens", "XA10")


def write_enhanced_asl_series(
    dicom_root: Path, target: Path, *, volumes: Sequence[str]
) -> list[Path]:
    """Write a Siemens XA enhanced ASL series (up to 4 volumes): each frame carries its volume's
    ASL Context in an MR Arterial Spin Labeling item, the shared groups the labelling contrast."""
    sources = sorted(dicom_root.joinpath(*ENHANCED_SOURCE).glob("*.dcm"))[: len(volumes)]
    series_uid = generate_uid()
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for source, context in zip(sources, volumes, strict=True):
        ds = pydicom.dcmread(source)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesDescription = ds.ProtocolName = "tgse_pcasl"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "ASL", "NONE"]
        for frame in ds.PerFrameFunctionalGroupsSequence:
            labelling = Dataset()
            labelling.ASLContext = context
            frame.MRArterialSpinLabelingSequence = [labelling]
        modifier = Dataset()
        modifier.ArterialSpinLabelingContrast = "PSEUDOCONTINUOUS"
        modifier.ASLPulseTrainDuration = 1800
        ds.SharedFunctionalGroupsSequence[0].MRModifierSequence = [modifier]
        path = target / source.name
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written
