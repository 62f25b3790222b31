"""Burned-in text risk: objects whose pixels may show names or dates are quarantined, not released.

Header de-identification cannot clean pixels (Clean Pixel Data, 113101, is not claimed). An object is
held back when it says it has burned-in annotation, when it is a Secondary Capture (screenshots,
scanned documents, dose screens), or when its ImageType or ConversionType marks a screen capture.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom import Dataset

SECONDARY_CAPTURE_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
        "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
        "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
    }
)
SCREEN_IMAGE_TYPES = frozenset(
    {"SCREEN SAVE", "SCREENSHOT", "DOSE INFO", "DOSE_INFO", "SECONDARY CAPTURE"}
)
# ConversionType (0008,0064): how a Secondary Capture was made (WSD workstation, SI scanned image...)
SCREEN_CONVERSIONS = frozenset({"WSD", "SD", "SI", "DI", "DF", "DV", "SYN"})


@dataclass(frozen=True)
class Quarantine:
    """The verdict for an object that must not be released; `reason` says why."""

    reason: str


def burned_in_risk(ds: Dataset) -> Quarantine | None:
    """A `Quarantine` when the object may carry identifying text in its pixels, else None."""
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        return Quarantine("BurnedInAnnotation (0028,0301) is YES")
    sop_class = str(ds.get("SOPClassUID", "")).strip()
    if sop_class in SECONDARY_CAPTURE_CLASSES:
        return Quarantine(f"Secondary Capture or encapsulated document SOP class {sop_class}")
    conversion = str(ds.get("ConversionType", "")).strip().upper()
    if conversion in SCREEN_CONVERSIONS:
        return Quarantine(f"ConversionType (0008,0064) {conversion}: a captured screen or scan")
    image_type = ds.get("ImageType") or []
    values = {
        str(v).strip().upper()
        for v in (
            image_type
            if isinstance(image_type, (list, tuple)) or type(image_type).__name__ == "MultiValue"
            else [image_type]
        )
    }
    hit = values & SCREEN_IMAGE_TYPES
    if hit:
        return Quarantine(f"ImageType (0008,0008) contains {sorted(hit)[0]}")
    return None
