"""Conversion of one stack to NIfTI (dcm2niix, dicom2nifti fallback) or to a DICOM copy."""

from services.exporter.convert.dcm2niix import ConverterError, dcm2niix_binary, dcm2niix_version
from services.exporter.convert.export import ExportError, export_stack
from services.exporter.convert.outputs import ConvertedImage, image_tokens
from services.exporter.convert.stack import (
    ConversionResult,
    OutputFile,
    convert_stack,
    copy_dicom_stack,
)

__all__ = [
    "ConversionResult",
    "ConvertedImage",
    "ConverterError",
    "ExportError",
    "OutputFile",
    "convert_stack",
    "copy_dicom_stack",
    "dcm2niix_binary",
    "dcm2niix_version",
    "export_stack",
    "image_tokens",
]
