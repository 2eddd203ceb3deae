"""Pure X.509 for the IoT PKI: profiles, remote signing, CSR checks, export, chain doctor.

No Azure, no I/O: callers pass time (``now``), keys and signers.
"""

from .errors import InvalidCsr, InvalidInput, InvalidPem, InvalidRegistrationId, PkiError, SigningError

__all__ = ["InvalidCsr", "InvalidInput", "InvalidPem", "InvalidRegistrationId", "PkiError", "SigningError"]
