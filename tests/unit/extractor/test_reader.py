"""The one-pass reader must give exactly what pydicom + header_json give, or step aside."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from services.extractor.catalog.header_json import dataset_to_json
from services.extractor.catalog.private_tags import private_elements
from services.extractor.catalog.reader import ReaderDeclined, read_header


def test_fast_reader_equals_pydicom_on_every_shared_file(shared_files: list[Path]) -> None:
    compared = declined = directories = 0
    for path in shared_files:
        content = path.read_bytes()
        try:
            fast = read_header(content)
        except ReaderDeclined:
            declined += 1
            continue
        if fast.media_sop_class_uid == "1.2.840.10008.1.3.10":
            assert fast.json == {}  # a DICOMDIR's records are skipped: it is rejected whole
            directories += 1
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(content), stop_before_pixels=True)
            private = private_elements(ds)
            reference = dataset_to_json(ds, keep_all_frames=True)
        assert fast.json == reference, path
        assert fast.private == private, path
        assert fast.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
        compared += 1
    # every DICOM file of the shared set but the big-endian one takes the fast route
    assert (compared, directories) == (2034, 2)
    assert declined == len(shared_files) - 2036


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_bigendian.dcm",  # big endian: declined
        "image_dfl.dcm",  # deflated data set: declined
        "ExplVR_LitEndNoMeta.dcm",  # no preamble, no file meta: declined
        "SC_rgb_jpeg.dcm",  # implicit VR written under an explicit transfer syntax: declined
    ],
)
def test_fast_reader_declines_what_it_does_not_handle(name: str) -> None:
    path = get_testdata_file(name, download=False)
    assert path is not None
    with pytest.raises(ReaderDeclined):
        read_header(Path(path).read_bytes())


def test_fast_reader_declines_a_cut_file(dicom_root: Path) -> None:
    content = (dicom_root / "dcm_qa_pdt2/In/Siemens/VE11/0001.dcm").read_bytes()
    with pytest.raises(ReaderDeclined):
        read_header(content[:20000])
    # the Pixel Data element starts at 141296; pydicom reports its value at 141308 (after 12 header bytes)
    assert read_header(content).pixel_offset == 141296
