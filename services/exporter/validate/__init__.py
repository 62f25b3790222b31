"""Validation of an exported dataset with the BIDS validator."""

from services.exporter.validate.validator import (
    ValidatorError,
    ValidatorIssue,
    ValidatorReport,
    run_bids_validator,
)

__all__ = ["ValidatorError", "ValidatorIssue", "ValidatorReport", "run_bids_validator"]
