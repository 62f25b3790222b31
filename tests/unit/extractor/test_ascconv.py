"""The Siemens protocol values kept from the CSA Series Header (ASCCONV) during the one parse."""

from __future__ import annotations

from pathlib import Path

from services.extractor.catalog.ascconv import siemens_ascconv
from services.extractor.catalog.parse import parse_instance
from services.extractor.catalog.records import InstanceRecord


def test_sequence_file_travels_in_the_stored_header(dicom_root: Path) -> None:
    path = dicom_root / "dcm_qa_pdt2/In/Siemens/VE11/0001.dcm"
    record = parse_instance(path, str(path))
    assert isinstance(record, InstanceRecord)
    element = record.header["00291020"]  # CSA Series Header Info, creator block 0x10
    assert element["vr"] == "OB" and "Value" not in element and "InlineBinary" not in element
    assert element["Ascconv"] == {"tSequenceFileName": "%SiemensSeq%\\tse"}


def test_ascconv_keys_only_inside_the_ascconv_block() -> None:
    blob = (
        b'SV10\x04\x03\x02\x01 binary tSequenceFileName = ""%fake%\\\\x""\n'
        b"### ASCCONV BEGIN object=MrProtDataImpl@MrProtocolData version=41340006 ###\n"
        b"ulVersion\t = 0x2710\n"
        b'tSequenceFileName\t = ""%CustomerSeq%\\ep2d_pcasl""\n'
        b'tProtocolName\t = ""Jane Doe research""\n'
        b"lRepetitions\t = 79\n"
        b"### ASCCONV END ###\n"
        b"lRepetitions = 3\n"
    )
    assert siemens_ascconv(blob) == {
        "tSequenceFileName": "%CustomerSeq%\\ep2d_pcasl",
        "lRepetitions": "79",
    }
    assert siemens_ascconv(b"no protocol here") == {}


def test_non_siemens_headers_get_nothing(dicom_root: Path) -> None:
    path = next((dicom_root / "dcm_qa_ct").rglob("*.dcm"), None) or next(
        p for p in (dicom_root / "dcm_qa_ct").rglob("*") if p.is_file()
    )
    record = parse_instance(path, str(path))
    assert isinstance(record, InstanceRecord)
    assert not any("Ascconv" in v for v in record.header.values() if isinstance(v, dict))
