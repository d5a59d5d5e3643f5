"""Server TLS contexts that can be replaced while the listener keeps running.

A listening socket keeps the `ssl.SSLContext` it was created with, and calling
`load_verify_locations` on it can only ever add CAs. So the listener gets a *front*
context whose SNI callback (OpenSSL calls it on every handshake, with or without SNI)
hands the connection the *current* context. `reload()` builds a complete new context
from the files, checks it, and only then makes it current: new handshakes get the new
certificate and trust bundle (a CA removed after a rollover stops being trusted), open
connections keep theirs, and a bad set is refused while the good one stays.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from runtime import names
from runtime.certificates import pem
from runtime.certificates.identity import TLSIdentity
from runtime.certificates.verification import verify_identity
from runtime.errors import CertificateError, MtlsError

log = logging.getLogger("hokusai_mtls")


@dataclass(frozen=True)
class ServerFiles:
    certificate: Path
    private_key: Path
    ca_bundle: Path

    @classmethod
    def from_directory(cls, directory: Path) -> ServerFiles:
        directory = Path(directory)
        return cls(directory / names.CERT_FILE, directory / names.KEY_FILE, directory / names.CA_BUNDLE_FILE)


def _context(files: ServerFiles) -> tuple[ssl.SSLContext, x509.Certificate]:
    """A TLS 1.2+ server context that requires a client certificate from the bundle's CAs."""
    try:
        identity = TLSIdentity.from_pem(
            files.certificate.read_bytes(), files.private_key.read_bytes(), str(files.certificate)
        )
        bundle = pem.load_certificates(files.ca_bundle.read_bytes(), str(files.ca_bundle))
    except OSError as exc:
        raise MtlsError(f"cannot read the server certificates: {exc}") from exc
    verify_identity(identity, bundle, kind=names.Kind.SERVER)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(files.certificate, files.private_key)
    context.load_verify_locations(cafile=str(files.ca_bundle))
    return context, identity.certificate


def check_openssl_accepts(directory: Path, kind: names.Kind) -> None:
    """Load the set in `directory` into the TLS stack that will use it, or raise `CertificateError`.

    `cryptography` and OpenSSL disagree at the edges (key types, encodings): the loader runs this
    on a new version before it becomes current, so a set OpenSSL refuses never replaces one it took.
    """
    try:
        if kind is names.Kind.SERVER:
            _context(ServerFiles.from_directory(directory))
            return
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_cert_chain(directory / names.COMBINED_PEM_FILE)
        context.load_verify_locations(cafile=str(directory / names.CA_BUNDLE_FILE))
    except (ssl.SSLError, OSError) as exc:
        raise CertificateError(f"{directory}: the TLS stack (OpenSSL) refuses the set: {exc}") from exc


class ReloadableServerContext:
    """The listener's context (`front`) and the one handshakes really use (swapped by `reload`)."""

    def __init__(self, files: ServerFiles, *, on_handshake: Callable[[], None] | None = None) -> None:
        """`on_handshake` is called as each handshake begins (metrics: started - completed = failed)."""
        self.files = files
        self._on_handshake = on_handshake
        self._lock = threading.Lock()
        self._current, self.certificate = _context(files)
        self.front, _ = _context(files)
        self.front.sni_callback = self._select
        self.reloads = 0

    def _select(self, ssl_object: ssl.SSLObject, server_name: str | None, front: ssl.SSLContext) -> None:
        ssl_object.context = self._current
        if self._on_handshake is not None:
            self._on_handshake()

    def reload(self) -> bool:
        """Swap in what the files hold now. False, and the old context kept, if they are bad.

        The files are those the loader publishes atomically, so a reload never reads half a set.
        """
        try:
            context, certificate = _context(self.files)
        except (MtlsError, CertificateError, ssl.SSLError, ValueError) as exc:
            log.error(
                "certificate reload refused, still serving serial %x: %s", self.certificate.serial_number, exc
            )
            return False
        with self._lock:
            renewed = certificate != self.certificate
            self._current, self.certificate = context, certificate
            self.reloads += 1
        if renewed:
            log.info(
                "serving certificate serial %x (expires %s) from now on",
                certificate.serial_number,
                f"{certificate.not_valid_after_utc:%Y-%m-%d}",
            )
        return True

    def days_left(self, now: dt.datetime | None = None) -> int:
        from runtime.certificates.inspection import days_left

        return days_left(self.certificate, now)
