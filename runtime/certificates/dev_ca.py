"""A local, development-only CA so services on one machine can speak mTLS without AWS.

Several local services may start at once and must share one CA to trust each other,
so creation is serialised with a file lock and the CA is reused once it exists.
It is never used outside `development` (the loader refuses).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from runtime import names
from runtime.certificates.certset import BUNDLE_FILE, CA_KEY_FILE
from runtime.certificates.files import (
    PRIVATE_FILE_MODE,
    PUBLIC_FILE_MODE,
    ensure_private_dir,
    write_file_atomic,
)
from runtime.certificates.issuance import CertificateAuthority

COMMON_NAME = "Hokusai DEVELOPMENT-ONLY local CA"


def default_dev_ca_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "hokusai-mtls" / "dev-ca"


def load_or_create_dev_ca(
    directory: Path, environment: str, *, may_degrade: bool | None = None
) -> CertificateAuthority:
    """The local development CA of `environment`, made on first use; only where it may degrade
    (`may_degrade`, else `names.may_degrade` from this process's environment)."""
    allowed = names.may_degrade(environment, os.environ) if may_degrade is None else may_degrade
    if not allowed:
        raise ValueError(f"a local development CA is not allowed in {environment} (it may not degrade)")
    directory = ensure_private_dir(Path(directory) / environment)
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        certificate, key = directory / BUNDLE_FILE, directory / CA_KEY_FILE
        if certificate.exists() and key.exists():
            return CertificateAuthority.from_pem(certificate.read_bytes(), key.read_bytes(), str(directory))
        ca = CertificateAuthority.create(environment, common_name=COMMON_NAME)
        write_file_atomic(key, ca.identity.private_key_pem(), PRIVATE_FILE_MODE)
        write_file_atomic(certificate, ca.identity.certificate_pem(), PUBLIC_FILE_MODE)
        return ca
