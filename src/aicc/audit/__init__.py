"""The tamper-evident audit log: a hash chain of entries in the state database, written by one
process in group commits, with HMAC-signed checkpoints beside it (see docs/security.md)."""

from aicc.audit.entries import AuditEntry
from aicc.audit.retention import RetentionTask
from aicc.audit.verify import VerifyReport, verify
from aicc.audit.writer import AuditLog, AuditWriteError

__all__ = ["AuditEntry", "AuditLog", "AuditWriteError", "RetentionTask", "VerifyReport", "verify"]
