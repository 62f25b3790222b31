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
    if end < 0:
        end = len(blob)
    found: dict[str, str] = {}
    for name in ASCCONV_KEYS:
        # the first line of the part that starts with the key, found with `find` and matched in
        # place (a regex scan of the whole part tried every position: five times slower)
        line = b"\n" + name.encode("ascii")
        at = blob.find(line, start, end)
        while at >= 0:
            match = _LINE.match(blob, at + 1, end)
            if match is not None:
                found[name] = match.group(2).decode("latin-1").strip().strip('"').strip()
                break
            at = blob.find(line, at + 1, end)
    return found
