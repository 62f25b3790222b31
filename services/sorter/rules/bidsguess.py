"""A second opinion in the manner of dcm2niix's `BidsGuess`, computed from the fingerprint alone.

dcm2niix (v1.0.20230731 and later) writes a `BidsGuess` [datatype, name] into every sidecar: a short,
ordered decision list over the header of one series (derived and localizer first, then diffusion,
field maps, ASL, EPI time series, then the anatomical contrasts from the sequence type and TR/TE/TI),
see its BidsGuess/README.md. This module follows that order over the values the extractor already put
into the fingerprint, so the opinion costs no second read of any file and no subprocess (decision
record: docs/adr-0016-bidsguess.md). It is deliberately simpler than the rule pack: a different,
coarser view whose disagreement is worth a human look.

`bids_guess` returns (datatype, suffix) with dcm2niix's vocabulary (`discard`/`localizer`,
`derived`/..., `anat`/`T1w`, `func`/`bold`, `fmap`/`epi`, `perf`/`asl`, ...) or None where it has no
opinion (non-image objects). `comparable` reduces both sides to what they can be compared on.
"""

from __future__ import annotations

from functools import lru_cache

from services.sorter.rules.fingerprint import Fingerprint

_CT = frozenset({"kind:ct", "kind:enhanced_ct", "kind:legacy_enhanced_ct"})
_PET = frozenset({"kind:pet", "kind:enhanced_pet", "kind:legacy_enhanced_pet"})
_LOCALIZER_WORDS = frozenset({"txt:localizer", "it:localizer"})
_ASL = frozenset(
    {
        "it:asl",
        "asl:pulse_train",
        "aslc:pseudocontinuous",
        "aslc:pulsed",
        "aslc:continuous",
        "asllabel:label",
        "asllabel:control",
        "sfn:ep2d_pcasl",
        "sfn:ep2d_pasl",
        "sfn:tgse_pcasl",
        "sfn:tgse_pasl",
        "sfn:ep2d_fairest",
        "sfn:to_ep2d_vepcasl",
        "seq:tgse",
    }
)
_DIFFUSION = frozenset({"it:diffusion", "seq:ep_b", "seq:re_b", "ac:diffusion", "phys:b_nonzero"})
_FIELDMAP = frozenset(
    {
        "seq:fm",
        "seqname:b0map",
        "seqname:3db0map",
        "it:field_map",
        "part:b0map",
        "txt:b0map",
        "txt:fieldmap",
        "txt:b0",
    }
)
_SPIN = frozenset({"ss:se", "eps:spin"})
_GRADIENT = frozenset({"ss:gr", "eps:gradient"})
_ANGIO = frozenset({"seqsfx:t", "tof:yes", "ac:tof", "angio:y"})
_SWI = frozenset({"seq:swi", "seqname:swan", "it:swi", "txt:swi", "txt:swip"})


def bids_guess(fp: Fingerprint) -> tuple[str, str] | None:
    """(datatype, suffix) the dcm2niix-style decision list gives for this stack, or None."""
    return _guess(fp.features)


def _guess(f: frozenset[str]) -> tuple[str, str] | None:
    """The decision list over feature tokens only (kind, modality and the TR/TE/TI facts are tokens).
    Not cached: feature sets carry description words, so they rarely repeat exactly."""
    if not _CT.isdisjoint(f):
        return "ct", "ct"
    if not _PET.isdisjoint(f):
        return "pet", "pet"
    if "mod:mr" not in f:
        return None
    if "it:derived" in f:
        return "derived", "derived"
    if not _LOCALIZER_WORDS.isdisjoint(f):
        return "discard", "localizer"
    if not _ASL.isdisjoint(f):
        return "perf", "m0scan" if "aslctx:m_zero_scan" in f else "asl"
    if not _DIFFUSION.isdisjoint(f):
        return "dwi", "dwi"
    if not _FIELDMAP.isdisjoint(f):
        if "cic:phase" in f or "it:p" in f:
            return "fmap", "phasediff"
        if "part:b0map" in f or "it:field_map" in f or ("vendor:ge" in f and "gevas:0" in f):
            return "fmap", "fieldmap"  # GE B0map: (0043,1030) 0 marks the Hz map
        return "fmap", "magnitude"
    if "phys:epi" in f:
        if "seqsfx:pepolar" in f or (
            (not _SPIN.isdisjoint(f) or "phys:te_ge60" in f) and "phys:many_volumes" not in f
        ):
            return "fmap", "epi"
        if "phys:dynamic" in f or "txt:bold" in f or "txt:fmri" in f:
            return "func", "bold"
        return "func", "sbref"
    return "anat", _anat_suffix(f)


def _anat_suffix(f: frozenset[str]) -> str:
    long_te = "phys:te_ge60" in f
    if "phys:ti_long" in f and long_te:
        return "FLAIR"
    if not _ANGIO.isdisjoint(f) and _SPIN.isdisjoint(f):
        return "angio"
    if not _SWI.isdisjoint(f):
        return "swi"
    if "phys:many_echoes" in f and not _GRADIENT.isdisjoint(f):
        return "MEGRE"
    if "phys:ti" in f and "phys:ti_long" not in f:
        return "T1w"  # inversion-prepared T1 (MPRAGE, IR-SPGR, T1-FLAIR)
    if not _SPIN.isdisjoint(f) or "seq:tse" in f:
        if long_te:
            return "T2w"
        return "T1w" if "phys:short_tr_short_te" in f else "PDw"
    if not _GRADIENT.isdisjoint(f):
        return "T2starw" if "phys:te_long_gre" in f else "T1w"
    return "unknown"


# names that are the same acquisition for the purpose of agreeing
_SAME = {
    "magnitude1": "magnitude",
    "magnitude2": "magnitude",
    "phase1": "phasediff",
    "phase2": "phasediff",
    "MEGRE": "T2starw",
    "IRT1": "T1w",
    "MP2RAGE": "T1w",
    "UNIT1": "T1w",
}


@lru_cache(maxsize=1024)
def comparable(datatype: str, suffix: str) -> str:
    """'fmap/magnitude2' -> 'fmap/magnitude'; localizers and exclusions -> 'discard'."""
    if datatype in ("", "discard") and suffix in ("", "localizer"):
        return "discard"
    return f"{datatype}/{_SAME.get(suffix, suffix)}"
