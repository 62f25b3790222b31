"""From decided axes to the BIDS datatype, suffix and entities the exporter names files with.

The pack's ordered `bids` table picks the entry; entities that depend on the stack itself are derived
here: `echo` (rank of the stack's TE among the series' echo times), `part` (complex component),
`inv` (MP2RAGE inversion), `dir` (phase-encoding direction words), `ce` (contrast agent), `task`
(BOLD: `rest` when the text says so, else the sanitized protocol), `rec` (CT kernel class, PET
attenuation correction, SyMRI) and `trc` (PET tracer). Fieldmap suffixes follow the echoes:
magnitude1/magnitude2 and phase1/phase2 when the series has two echo times, phasediff otherwise.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from services.sorter.rules.fingerprint import Fingerprint
from services.sorter.rules.pack import BidsEntry

if TYPE_CHECKING:
    from services.sorter.rules.classify import Classification

_LABEL = re.compile(r"[^A-Za-z0-9]+")
_PART = {"Phase": "phase", "Real": "real", "Imaginary": "imag", "Magnitude": "mag"}
_PART_SUFFIXES = {"swi", "MEGRE", "MP2RAGE", "bold", "T2starw", "T1w", "dwi", "UNIT1", "IRT1"}
_ECHO_SUFFIXES = {
    "bold",
    "sbref",
    "MEGRE",
    "MESE",
    "MP2RAGE",
    "T1w",
    "T2starw",
    "swi",
    "dwi",
    "epi",
    "asl",
}
_DIR_WORDS = {"ap": "AP", "pa": "PA", "lr": "LR", "rl": "RL", "si": "SI", "is": "IS"}
_DIR_SUFFIXES = {"epi", "dwi", "bold", "sbref", "asl", "m0scan"}
_DERIVED = frozenset({"it:derived", "it:secondary"})
_AGENT_WORD = re.compile(r"[A-Za-z][A-Za-z0-9]*")
_UNITS = {"ml", "mg", "mmol", "cc", "l", "kg", "iv", "i", "v"}


def sanitize_label(text: str, limit: int = 24) -> str:
    """A BIDS label: letters and digits only (`"REST1 w SMS"` -> `"REST1wSMS"`)."""
    return _LABEL.sub("", text)[:limit]


def agent_label(agent: str) -> str:
    """ContrastBolusAgent (0018,0010) as a `ce-` label: the first word that is not a dose or unit
    ("11 ml Omniscan" -> "omniscan", "ISOVUE300/100" -> "isovue300")."""
    for word in _AGENT_WORD.findall(agent):
        if word.lower() not in _UNITS:
            return str(word).lower()
    return ""


def match_bids(fp: Fingerprint, result: Classification, table: tuple[BidsEntry, ...]) -> BidsEntry:
    derived = bool(_DERIVED & fp.features)
    for entry in table:
        w = entry.when
        if w.intent and result.intent not in w.intent:
            continue
        if w.base and result.base not in w.base:
            continue
        if w.technique and result.technique not in w.technique:
            continue
        if w.provenance and result.provenance not in w.provenance:
            continue
        if w.kind and fp.kind not in w.kind:
            continue
        if w.modifiers_any and result.modifiers.isdisjoint(w.modifiers_any):
            continue
        if w.modifiers_none and not result.modifiers.isdisjoint(w.modifiers_none):
            continue
        if w.constructs_any and result.constructs.isdisjoint(w.constructs_any):
            continue
        if w.constructs_none and not result.constructs.isdisjoint(w.constructs_none):
            continue
        if w.derived is not None and derived != w.derived:
            continue
        return entry
    raise ValueError("the rule pack's bids table needs a final catch-all entry")


def echo_index(fp: Fingerprint) -> int | None:
    """1-based rank of the stack's echo time among the series' echo times (None if single echo).

    TE 0 is not an echo: computed maps (Philips B0 FIELD_MAP frames) carry EffectiveEchoTime 0.
    """
    echo_times = [te for te in fp.echo_times if te > 0]
    if len(echo_times) < 2 or fp.te is None:
        return None
    for rank, te in enumerate(echo_times, start=1):
        if abs(te - fp.te) < 0.01:
            return rank
    return fp.echo_number


def _fieldmap_suffix(suffix: str, fp: Fingerprint) -> str:
    echo = echo_index(fp)
    if suffix == "magnitude" and echo is not None:
        return f"magnitude{echo}"
    if suffix == "phasediff" and echo is not None:
        return f"phase{echo}"
    return suffix


def _task(fp: Fingerprint) -> str:
    if "rest" in fp.text_tokens:
        return "rest"
    return sanitize_label(fp.protocol or fp.description).lower() or "unknown"


def bids_entities(
    fp: Fingerprint, result: Classification, entry: BidsEntry
) -> tuple[str, dict[str, str]]:
    """The final suffix (fieldmap numbering) and the entities of the stack."""
    suffix = entry.suffix
    entities = dict(entry.entities)
    if not suffix:
        return suffix, entities
    if entry.datatype == "fmap":
        suffix = _fieldmap_suffix(suffix, fp)
    if suffix in ("bold", "sbref"):
        entities["task"] = _task(fp)
    if suffix in _ECHO_SUFFIXES:
        echo = echo_index(fp)
        if echo is not None:
            entities["echo"] = str(echo)
    if suffix in _PART_SUFFIXES:
        for construct, part in _PART.items():
            if construct in result.constructs and (
                part != "mag" or suffix in {"swi", "MEGRE", "MP2RAGE"}
            ):
                entities["part"] = part
                break
    if suffix == "MP2RAGE":
        if "INV1" in result.constructs:
            entities["inv"] = "1"
        elif "INV2" in result.constructs:
            entities["inv"] = "2"
    if suffix in _DIR_SUFFIXES:
        for word, label in _DIR_WORDS.items():
            if word in fp.text_tokens:
                entities["dir"] = label
                break
    if result.post_contrast:
        fallback = "gadolinium" if fp.modality == "MR" else "contrast"
        entities["ce"] = agent_label(fp.contrast_agent) or fallback
    if suffix == "ct" and result.kernel:
        entities["rec"] = result.kernel
    if suffix == "pet":
        recon = "nac" if result.pet_recon == "NAC" else "ac"
        entities["rec"] = recon + ("dyn" if fp.n_volumes > 1 else "stat")
        if fp.pet_tracer:
            entities["trc"] = sanitize_label(fp.pet_tracer).lower()
    if result.provenance == "EPIMix" and entry.datatype == "anat":
        entities.setdefault("rec", "epimix")  # EPIMix contrasts come from one EPI acquisition
    if "STIR" in result.modifiers and suffix == "T2w":
        entities.setdefault("acq", "stir")
    return suffix, entities
