"""The trust a forwarded client certificate is checked against: the loader's latest bundle and lists.

A certificate that a proxy forwards (an ALB in mutual-TLS verify mode, Envoy's XFCC) never went through
our TLS layer, so the TLS context's bundle and revocations never see it: the middleware verifies it
again (`runtime.auth.proxy_certificate`). Against what? Not the bundle read at start-up: a rollover's
`finish` retires a CA and `certs revoke` lists a certificate while the task runs. So against the files
the loader last published in the role's directory (`ca.crt`, `crl.pem`): the `..data` link names the
version (`runtime.certificates.files`), so a refresh is followed on the next forwarded request, in
every worker process, for one readlink per request and one parse per new version. A version that
cannot be read or verified keeps the trust of the previous one, and says so.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from runtime import names
from runtime.certificates import pem
from runtime.certificates.files import DATA_LINK
from runtime.certificates.revocation import NOTHING_REVOKED, Revocations
from runtime.errors import CertificateError

log = logging.getLogger("hokusai_mtls")

Trust = tuple[tuple[x509.Certificate, ...], Revocations]


class PublishedTrust:
    """`current()`: the bundle and revocations of the latest published version in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._version: str | None = None
        self._trust: Trust = ((), NOTHING_REVOKED)
        self.current()
        if not self._trust[0]:
            raise CertificateError(f"{self.directory}: no trust bundle ({names.CA_BUNDLE_FILE}) published")

    def current(self) -> Trust:
        try:
            version = os.readlink(self.directory / DATA_LINK)
        except OSError:
            version = None  # a directory written without versions (a test's, an operator's): read it once
        if version == self._version and self._trust[0]:
            return self._trust
        with self._lock:
            if version != self._version or not self._trust[0]:
                self._read(version)
        return self._trust

    def _read(self, version: str | None) -> None:
        bundle_file = self.directory / names.CA_BUNDLE_FILE
        revocations_file = self.directory / names.REVOCATIONS_FILE
        try:
            bundle = tuple(pem.load_certificates(bundle_file.read_bytes(), str(bundle_file)))
            revocations = (
                Revocations.from_pem(revocations_file.read_bytes(), bundle, str(revocations_file))
                if revocations_file.exists()
                else NOTHING_REVOKED
            )
        except (OSError, CertificateError) as exc:
            log.error("forwarded certificates: keeping the previous trust bundle and revocations: %s", exc)
            self._version = version  # the loader's next version is read; this one is not retried per request
            return
        self._version, self._trust = version, (bundle, revocations)


@dataclass(frozen=True)
class StaticTrust:
    """A fixed bundle and revocations, for an app that holds its trust itself (and for tests)."""

    bundle: tuple[x509.Certificate, ...]
    revocations: Revocations = NOTHING_REVOKED

    def current(self) -> Trust:
        return self.bundle, self.revocations


__all__ = ["PublishedTrust", "StaticTrust", "Trust"]
