"""The encrypted audit export: per study and file, what de-identification removed, replaced or kept.

Pure: builds bytes from rows; the service stores them in the audit bucket. See `export`.
"""

from services.anonymizer.audit.export import (
    AUDIT_FORMATS,
    AuditPasswordError,
    AuditRow,
    SubjectRow,
    audit_row,
    decrypt_audit,
    write_audit,
)

__all__ = [
    "AUDIT_FORMATS",
    "AuditPasswordError",
    "AuditRow",
    "SubjectRow",
    "audit_row",
    "decrypt_audit",
    "write_audit",
]
