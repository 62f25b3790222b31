"""Cohortflow: DICOM to trusted research data, as one event-driven system."""
