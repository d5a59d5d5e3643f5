"""Server TLS contexts that can be replaced while the listener keeps running.

A listening socket keeps the `ssl.SSLContext` it was created with, and calling
`load_verify_locations` on it can only ever add CAs. So the listener gets a *front*
context whose SNI callback (OpenSSL calls it on every handshake, with or without SNI)
hands the connection the *current* context. `reload()` builds a complete new context
from the files, checks it, and only then makes it current: new handshakes get the new
certificate and trust bundle (a CA removed after a rollover stops being trusted), open
connections keep theirs, and a bad set is refused while the good one stays. Until the first
reload the front context is the current one, and the callback swaps nothing.

Session resumption: every full handshake issues one TLS 1.3 session ticket
(`TICKETS_PER_HANDSHAKE`), so a client that reconnects with it skips the certificate exchange
and the signatures (TLS 1.2 clients get an RFC 5077 ticket and a session ID, as before). OpenSSL
encrypts the tickets with keys of the *front* context (the one each connection was created
with; the SNI callback does not change it), made at random when the process starts and never
rotated (Python cannot set or rotate them): a ticket resumes only in the process that issued it,
so with several worker processes on one socket a client resumes when its connection reaches the
worker that issued its ticket and makes a full handshake elsewhere. A ticket is good for
OpenSSL's default session lifetime, 7200 s, and every resumption issues a new one (Python cannot
set the lifetime: no `SSL_CTX_set_timeout`). A resumed session carries the client certificate of
the full handshake it descends from, and OpenSSL does not verify it again: `ResumedSessions`
does, against the trust bundle and the clock of the context current at the resumption, and
`runtime.serving.asgi_tls` drops the connection before any request when it fails.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from runtime import names
from runtime.certificates import pem
from runtime.certificates.identity import TLSIdentity
from runtime.certificates.revocation import NOTHING_REVOKED, Revocations
from runtime.certificates.verification import find_issuer, verify_identity
from runtime.errors import CertificateError, MtlsError

log = logging.getLogger("hokusai_mtls")

TICKETS_PER_HANDSHAKE = 1
"""TLS 1.3 session tickets sent after each handshake (OpenSSL's default is 2, and each costs the
server about 0.15 ms of CPU: a session copy, its encoding and encryption). A client resumes with
one; OpenSSL's tickets are stateless and may be used more than once (there is no 0-RTT here), so
connections a client opens in parallel can all resume with it, and every resumption issues the
next one."""
RESUMED_CERTIFICATES_KEPT = 1024
"""Client certificates whose re-check `ResumedSessions` remembers, per context (then it starts over)."""
_NEVER = (float("inf"), float("-inf"))


def _now() -> float:
    """The clock resumed sessions are checked against (a test moves it)."""
    return time.time()


class ResumedSessions:
    """Whether the client certificate of a resumed TLS session would pass a full handshake now.

    On a full handshake OpenSSL verifies the client's chain against the trust bundle and the clock.
    On a resumed one it verifies nothing: the session brings back the certificate of the full
    handshake it descends from, possibly hours and several reloads ago. What can have changed since
    is the time and the trust bundle, so a resumed certificate is admitted only while it and the CA
    of this bundle that signed it (`verification.find_issuer`, a signature check) are both within
    their validity. A certificate that no CA of the bundle signed directly (one issued by an
    intermediate) is refused: the session does not keep the chain it was verified with.

    The answer for each certificate is kept (as the window of time in which it is admitted), so a
    client that resumes again costs a dictionary lookup. One per context: a reload starts afresh.
    """

    def __init__(self, bundle: Sequence[x509.Certificate]) -> None:
        self._bundle = tuple(bundle)
        self._windows: dict[bytes, tuple[float, float]] = {}

    def admits(self, certificate_der: bytes | None) -> bool:
        return self.refusal(certificate_der) is None

    def refusal(self, certificate_der: bytes | None) -> str | None:
        """None if the resumed certificate is admitted, else why not (`names.HANDSHAKE_FAILURE_REASONS`):
        no certificate, no CA of the bundle signed it (or it cannot be read), or outside its dates."""
        if not certificate_der:
            return names.HANDSHAKE_NO_CERTIFICATE
        window = self._windows.get(certificate_der)
        if window is None:
            window = self._window(certificate_der)
            if len(self._windows) >= RESUMED_CERTIFICATES_KEPT:
                self._windows.clear()
            self._windows[certificate_der] = window
        if window == _NEVER:
            return names.HANDSHAKE_UNKNOWN_CA
        now = _now()
        if now < window[0]:
            return names.HANDSHAKE_NOT_YET_VALID
        if now > window[1]:
            return names.HANDSHAKE_EXPIRED
        return None

    def _window(self, certificate_der: bytes) -> tuple[float, float]:
        try:
            certificate = x509.load_der_x509_certificate(certificate_der)
            issuer = find_issuer(certificate, self._bundle, "the client certificate of a resumed session")
            return (
                max(certificate.not_valid_before_utc, issuer.not_valid_before_utc).timestamp(),
                min(certificate.not_valid_after_utc, issuer.not_valid_after_utc).timestamp(),
            )
        except Exception as exc:  # hostile input's rule: whatever fails to read or verify refuses
            log.info("a resumed TLS session is refused: %s", exc)
            return _NEVER


class ServerContext(ssl.SSLContext):
    """A server `SSLContext` that also knows how to re-check its resumed sessions and which client
    certificates are revoked (`runtime.certificates.revocation`: both are checked once a connection is up).

    `ssl_object.context` is the very object: after the SNI callback, the current context.
    """

    resumed_sessions: ResumedSessions | None = None
    revocations: Revocations = NOTHING_REVOKED
    latest: Callable[[], ServerContext] | None = None
    """The context new handshakes use now (`ReloadableServerContext` sets it): a connection made before a
    reload checks each request against the revocations of the latest one."""


@dataclass(frozen=True)
class ServerFiles:
    certificate: Path
    private_key: Path
    ca_bundle: Path
    revocations: Path | None = None
    """The loader's `crl.pem`; None, or no such file: nothing is revoked."""

    @classmethod
    def from_directory(cls, directory: Path) -> ServerFiles:
        directory = Path(directory)
        return cls(
            directory / names.CERT_FILE,
            directory / names.KEY_FILE,
            directory / names.CA_BUNDLE_FILE,
            directory / names.REVOCATIONS_FILE,
        )

    def read_revocations(self, bundle: Sequence[x509.Certificate]) -> Revocations:
        """The verified revocations of `self.revocations` (`RevocationListError` if a list is not the CA's)."""
        if self.revocations is None:
            return NOTHING_REVOKED
        try:
            data = self.revocations.read_bytes()
        except FileNotFoundError:
            return NOTHING_REVOKED
        return Revocations.from_pem(data, bundle, str(self.revocations))


def _context(
    files: ServerFiles, session_tickets: int = TICKETS_PER_HANDSHAKE
) -> tuple[ServerContext, x509.Certificate]:
    """A TLS 1.2+ server context that requires a client certificate from the bundle's CAs."""
    try:
        identity = TLSIdentity.from_pem(
            files.certificate.read_bytes(), files.private_key.read_bytes(), str(files.certificate)
        )
        bundle = pem.load_certificates(files.ca_bundle.read_bytes(), str(files.ca_bundle))
        revocations = files.read_revocations(bundle)
    except OSError as exc:
        raise MtlsError(f"cannot read the server certificates: {exc}") from exc
    verify_identity(identity, bundle, kind=names.Kind.SERVER)
    context = ServerContext(ssl.PROTOCOL_TLS_SERVER)  # Python's cipher choices for TLS 1.2, OpenSSL's for 1.3
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    # The identity is read once per connection (runtime.serving.asgi_tls): its client certificate must
    # never change. OpenSSL 3 refuses client-initiated renegotiation already; this says so for any build.
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.num_tickets = session_tickets
    context.load_cert_chain(files.certificate, files.private_key)
    context.load_verify_locations(cafile=str(files.ca_bundle))
    context.resumed_sessions = ResumedSessions(bundle)
    context.revocations = revocations
    return context, identity.certificate


def check_openssl_accepts(directory: Path, kind: names.Kind) -> None:
    """Load the set in `directory` into the TLS stack that will use it, or raise `CertificateError`.

    `cryptography` and OpenSSL disagree at the edges (key types, encodings): the loader runs this
    on a new version before it becomes current, so a set OpenSSL refuses never replaces one it took.
    """
    try:
        if kind in (names.Kind.SERVER, names.Kind.BOTH):
            _context(ServerFiles.from_directory(directory))
        if kind is names.Kind.SERVER:
            return
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_cert_chain(directory / names.COMBINED_PEM_FILE)
        context.load_verify_locations(cafile=str(directory / names.CA_BUNDLE_FILE))
    except (ssl.SSLError, OSError) as exc:
        raise CertificateError(f"{directory}: the TLS stack (OpenSSL) refuses the set: {exc}") from exc


class ReloadableServerContext:
    """The listener's context (`front`) and the one handshakes really use (swapped by `reload`)."""

    def __init__(
        self,
        files: ServerFiles,
        *,
        on_handshake: Callable[[], None] | None = None,
        session_tickets: int = TICKETS_PER_HANDSHAKE,
    ) -> None:
        """`on_handshake` is called as each handshake begins (metrics: started - completed = failed).

        `session_tickets`: TLS 1.3 tickets per full handshake; 0 offers TLS 1.3 clients no resumption
        and saves the first ticket's cost (for a listener whose clients never resume: Python's `ssl`
        resumes only when it is handed a session, which requests, httpx and MLflow's client never do).
        """
        self.files = files
        self.session_tickets = session_tickets
        self._on_handshake = on_handshake
        self._lock = threading.Lock()
        self._current, self.certificate = _context(files, session_tickets)
        self.front: ServerContext = self._current
        self.front.sni_callback = self._select
        self.front.latest = self._latest
        self.reloads = 0
        if revoked := len(self._current.revocations):
            log.info("refusing %d revoked client certificate(s)", revoked)

    @property
    def current(self) -> ServerContext:
        """The context new handshakes use (the front one until the first reload)."""
        return self._current

    def _latest(self) -> ServerContext:
        return self._current

    def _select(self, ssl_object: ssl.SSLObject, server_name: str | None, front: ssl.SSLContext) -> None:
        current = self._current
        if current is not self.front:  # a switch copies the certificate structures: only when needed
            ssl_object.context = current
        if self._on_handshake is not None:
            self._on_handshake()

    def reload(self) -> bool:
        """Swap in what the files hold now. False, and the old context kept, if they are bad.

        The files are those the loader publishes atomically, so a reload never reads half a set.
        """
        try:
            context, certificate = _context(self.files, self.session_tickets)
        except (MtlsError, CertificateError, ssl.SSLError, ValueError) as exc:
            log.error(
                "certificate reload refused, still serving serial %x: %s", self.certificate.serial_number, exc
            )
            return False
        context.latest = self._latest
        with self._lock:
            renewed = certificate != self.certificate
            newly_revoked = context.revocations.entries - self._current.revocations.entries
            self._current, self.certificate = context, certificate
            self.reloads += 1
        if newly_revoked:
            log.warning(
                "refusing %d more revoked client certificate(s) from now on (serials %s); %d revoked in all",
                len(newly_revoked),
                ", ".join(sorted(f"{serial:x}" for _, serial in newly_revoked)),
                len(context.revocations),
            )
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
