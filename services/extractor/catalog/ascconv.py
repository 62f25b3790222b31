"""A few Siemens protocol values from the ASCII part ("ASCCONV") of the CSA Series Header.

Classic Siemens images carry the whole measurement protocol as text inside the CSA Series Header Info
(0029,xx20, creator "SIEMENS CSA HEADER"), between `### ASCCONV BEGIN` and `### ASCCONV END`. The
element is far larger than what the catalogue keeps per value, so it never reaches the stored header;
the extractor, which has the bytes in hand anyway, keeps only these keys:

- `tSequenceFileName`: the sequence binary, e.g. `%SiemensSeq%\\ep2d_pasl`, `%CustomerSeq%\\ep2d_pcasl`,
  `%SiemensSeq%\\tgse_pcasl`, `%SiemensSeq%\\ep2d_bold`. It names the technique where SequenceName
  (0018,0024) does not: a 2D pCASL and a BOLD run both have SequenceName `*epfid2d1_64`. dcm2niix
  reads the same key to recognise ASL (nii_dicom_batch.cpp, `siemensCsaAscii`, "tSequenceFileName").
- `lRepetitions`: repetitions after the first, so the run has lRepetitions + 1 volumes; this tells the
  length of a time series from a single file of it.

Identifying text (tProtocolName, coil and patient fields) is deliberately not kept.
"""

from __future__ import annotations

import re

ASCCONV_KEYS = ("tSequenceFileName", "lRepetitions")
_BEGIN = b"### ASCCONV BEGIN"
_END = b"### ASCCONV END"
_LINE = re.compile(rb"^(tSequenceFileName|lRepetitions)\s*=\s*(.+?)\s*$", re.MULTILINE)


def siemens_ascconv(blob: bytes) -> dict[str, str]:
    """The `ASCCONV_KEYS` found in a CSA Series Header blob (empty when there is no ASCCONV part)."""
    start = blob.find(_BEGIN)
    if start < 0:
        return {}
    end = blob.find(_END, start)
    text = blob[start : end if end > 0 else len(blob)]
    found: dict[str, str] = {}
    for key, value in _LINE.findall(text):
        name = key.decode("ascii")
        if name not in found:
            found[name] = value.decode("latin-1").strip().strip('"').strip()
    return found
