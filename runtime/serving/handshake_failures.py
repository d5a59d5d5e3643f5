"""Why a TLS handshake on an mTLS listener failed, in a word an operator can act on (issue 16).

Until now a refused handshake only moved `started - completed`; the most common complaint about meshes
is exactly that: the count goes up, and nobody knows whose certificate or why. The acceptor hands every
failed handshake's exception to `classify`, which names one of `names.HANDSHAKE_FAILURE_REASONS`:

- `no_certificate`: the client sent none (strict mTLS requires one);
- `unknown_ca`: its chain does not lead to a CA of this environment's bundle (another environment's,
  a self-signed or a forged certificate);
- `expired`, `not_yet_valid`: outside its dates (a rotation that never reached the client, a clock);
- `wrong_usage`: a certificate without clientAuth (a server's leaf used as a client's);
- `revoked`: on a revocation list;
- `bad_certificate`: any other verification failure (a bad signature, a malformed certificate);
- `peer_alert`: the client refused *us* (it does not trust our server certificate or its name);
- `protocol`: not TLS we speak (plain HTTP to the TLS port, an old version, no shared cipher);
- `timeout`: no handshake within the listener's handshake timeout;
- `reset`: the connection closed or reset mid-handshake.

OpenSSL's verify code is what tells the certificate reasons apart; Python's `ssl` does not hand the
server the refused certificate itself, so its subject and serial cannot be logged (the client's
address and OpenSSL's own message are). `FailureLog` logs a failure at most once per peer address and
reason per interval, with a bounded memory, so a scanner cannot flood the log or the process.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable

from runtime import names

log = logging.getLogger("hokusai_mtls")

_VERIFY_REASONS = {
    2: names.HANDSHAKE_UNKNOWN_CA,  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT
    7: names.HANDSHAKE_UNKNOWN_CA,  # X509_V_ERR_CERT_SIGNATURE_FAILURE: signed by a key not ours
    9: names.HANDSHAKE_NOT_YET_VALID,  # X509_V_ERR_CERT_NOT_YET_VALID
    10: names.HANDSHAKE_EXPIRED,  # X509_V_ERR_CERT_HAS_EXPIRED
    18: names.HANDSHAKE_UNKNOWN_CA,  # X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
    19: names.HANDSHAKE_UNKNOWN_CA,  # X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN
    20: names.HANDSHAKE_UNKNOWN_CA,  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: names.HANDSHAKE_UNKNOWN_CA,  # X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE
    23: names.HANDSHAKE_REVOKED,  # X509_V_ERR_CERT_REVOKED
    26: names.HANDSHAKE_WRONG_USAGE,  # X509_V_ERR_INVALID_PURPOSE
}
"""OpenSSL verify codes (include/openssl/x509_vfy.h) -> reason; any other code is `bad_certificate`."""

LOG_INTERVAL_SECONDS = 60.0
MAX_LOGGED_PEERS = 1024
"""Distinct (peer address, reason) pairs remembered per interval; beyond, failures are only counted and
one line says how many went unlogged."""


def classify(exc: BaseException) -> str:
    """The reason (`names.HANDSHAKE_FAILURE_REASONS`) a handshake failed with `exc`."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(exc.verify_code, names.HANDSHAKE_BAD_CERTIFICATE)
    if isinstance(exc, ssl.SSLError):
        reason = str(getattr(exc, "reason", None) or "").upper()
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return names.HANDSHAKE_NO_CERTIFICATE
        if reason == "CERTIFICATE_VERIFY_FAILED":
            return names.HANDSHAKE_BAD_CERTIFICATE
        if reason.startswith(("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_")):
            return names.HANDSHAKE_PEER_ALERT
        if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return names.HANDSHAKE_RESET
        return names.HANDSHAKE_PROTOCOL
    if isinstance(exc, TimeoutError) or (
        isinstance(exc, ConnectionAbortedError) and "handshake is taking longer" in str(exc)
    ):
        return names.HANDSHAKE_TIMEOUT
    return names.HANDSHAKE_RESET


def describe(exc: BaseException) -> str:
    """OpenSSL's words for `exc` (its verify message, else its reason), never a certificate's content."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return str(exc.verify_message)
    if isinstance(exc, ssl.SSLError) and getattr(exc, "reason", None):
        return str(exc.reason)
    return type(exc).__name__


class FailureLog:
    """Logs each failed handshake at WARNING at most once per (peer address, reason) per interval."""

    def __init__(
        self,
        listener: str,
        *,
        interval: float = LOG_INTERVAL_SECONDS,
        max_peers: int = MAX_LOGGED_PEERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.listener = listener
        self.interval = interval
        self.max_peers = max_peers
        self._clock = clock
        self._seen: set[tuple[str, str]] = set()
        self._unlogged = 0
        self._window_ends = clock() + interval

    def failed(self, reason: str, host: str, detail: str) -> None:
        """`host`: the peer's address (one line per address, whatever its source port)."""
        now = self._clock()
        if now >= self._window_ends:
            self._close_window(now)
        key = (host, reason)
        if key in self._seen:
            return
        if len(self._seen) >= self.max_peers:
            self._unlogged += 1
            return
        self._seen.add(key)
        log.warning(
            "listener %s: mTLS handshake from %s refused: %s (%s); further %s failures from this address "
            "are counted, not logged, for %.0f s",
            self.listener,
            host,
            reason,
            detail,
            reason,
            self.interval,
        )

    def _close_window(self, now: float) -> None:
        if self._unlogged:
            log.warning(
                "listener %s: %d more refused handshakes from other addresses were not logged in the last "
                "%.0f s (more than %d distinct addresses and reasons); see the MtlsHandshakeFailures metric "
                "by Reason",
                self.listener,
                self._unlogged,
                self.interval,
                self.max_peers,
            )
        self._seen.clear()
        self._unlogged = 0
        self._window_ends = now + self.interval
