"""`aicc doctor`: checks of this machine, the configured state, and optionally a running server.

Every check is a `CheckResult` (PASS / WARN / FAIL / SKIP, the measured value, a one-line fix);
`run_doctor` collects them in a fixed order. Nothing is contacted except the configured database,
LDAP directory and, when asked, the server under check.
"""

from aicc.doctor.checks import CheckResult, Status
from aicc.doctor.runner import DoctorOptions, run_doctor

__all__ = ["CheckResult", "DoctorOptions", "Status", "run_doctor"]
