"""`hokusai-mtls certs revoke`: an identity's certificates (or given serials) refused by every server.

Short leaves are the first revocation: a stolen key is good for a day at most. This is for that day.
For `--identity NAME`, in this order:

1. a fresh leaf for the identity (the names, key type and lifetime of the one it replaces, from the
   issuing CA in `ca-key`, verified as the loader will verify it), as the new current version of its
   secret: its own tasks move to it at their next refresh;
2. then the issuing CA's list in `ca-crl` (`runtime.certificates.revocation`) gains every certificate of
   that secret still in date: the current version and the older ones Secrets Manager keeps (leaves of a
   day rotate every 8 hours, so three may be in date at once), the one just replaced among them.

Every server re-reads `ca-crl` with the rest of its set at each refresh, verifies each list against its
trust bundle, and from then on refuses the revoked certificates, on new connections and on the next
request of a connection made before (`runtime.serving.asgi_tls`). So within one refresh interval
(`HOKUSAI_MTLS_REFRESH_SECONDS`) every server refuses them, without a restart. The identity's own tasks
still on the old leaf are refused from their server's refresh until their own (one interval at most):
revocation trades those calls for the certainty that the revoked key is out.

`--serial HEX` revokes certificates by serial (step 2 only: no secret is replaced; a serial the issuing
CA did not issue is revoked under its name all the same). A certificate that another CA issued (before
a rollover's switch) cannot be revoked by the issuing CA's list: it is reported, with its expiry.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError
from cryptography import x509

from runtime import names
from runtime.certificates import pem
from runtime.certificates.certset import verify_for
from runtime.certificates.identity import TLSIdentity
from runtime.certificates.inspection import describe_certificate
from runtime.certificates.issuance import CLOCK_SKEW_ALLOWANCE, CertificateAuthority
from runtime.certificates.revocation import Revocations, of_bundle, replace_list
from runtime.errors import MtlsError, SecretNotFoundError, SecretStoreError
from runtime.secrets.rollover import RolloverStore, reissue_options
from runtime.secrets.secret_store import translate

MAX_VERSION_PAGES = 10


class RevocationError(MtlsError):
    """A revocation that cannot be made as asked (nothing to revoke, no place to record it)."""

    code = "revocation-failed"


@dataclass(frozen=True)
class Revoked:
    """What one run revoked and replaced, for the operator's record."""

    serials: tuple[int, ...]
    lines: tuple[str, ...]


class RevocationStore(RolloverStore):
    """The rollover store, plus the identity's older versions and the revocation lists."""

    def certificates_of(self, identity: names.Identity) -> list[tuple[str, x509.Certificate]]:
        """(version, certificate) of every version of the identity's secret that still reads."""
        secret_id = self.name(identity.secret_suffix)
        try:
            versions, token = [], None
            for _ in range(
                MAX_VERSION_PAGES
            ):  # Secrets Manager keeps about 100 versions: a bound, not a wait
                page = self._client.list_secret_version_ids(
                    SecretId=secret_id,
                    IncludeDeprecated=True,
                    MaxResults=100,
                    **({"NextToken": token} if token else {}),
                )
                versions += [version["VersionId"] for version in page["Versions"]]
                if not (token := page.get("NextToken")):
                    break
            found = []
            for version in versions:
                try:
                    value = self._client.get_secret_value(SecretId=secret_id, VersionId=version)
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
                        continue  # removed since it was listed (Secrets Manager prunes old versions)
                    raise
                try:
                    tls = TLSIdentity.from_secret_string(
                        value.get("SecretString", ""), f"{secret_id} {version}"
                    )
                except MtlsError:
                    continue  # a version that never held a pair (a CDK shell's placeholder): nothing to revoke
                found.append((version, tls.certificate))
        except (ClientError, BotoCoreError) as exc:
            raise translate(secret_id, exc) from exc
        return found

    def check_revocations_secret(self) -> None:
        """The stacks create `ca-crl`: refuse to create one of our own (a key and a policy not theirs)."""
        secret_id = self.name(names.CA_REVOCATIONS_SECRET)
        try:
            self._client.describe_secret(SecretId=secret_id)
        except (ClientError, BotoCoreError) as exc:
            error = translate(secret_id, exc)
            if isinstance(error, SecretNotFoundError):
                raise RevocationError(
                    f"{secret_id} does not exist: deploy this version's stacks first (they create it, "
                    "encrypted with the environment's key, readable by the servers only)"
                ) from exc
            raise error from exc

    def write_revocations(self, crls: Sequence[x509.CertificateRevocationList]) -> str:
        return self.write(names.CA_REVOCATIONS_SECRET, pem.crls_pem(list(crls)).decode(), "revocations", None)


def revoke(
    store: RevocationStore,
    *,
    identity: names.Identity | None = None,
    serials: Iterable[int] = (),
    leaf_lifetime_hours: float | None = None,
    now: dt.datetime | None = None,
) -> Revoked:
    """Revoke `identity`'s certificates in date (after giving it a fresh leaf) and/or `serials`."""
    now = now or dt.datetime.now(dt.UTC)
    serials = list(serials)
    if identity is None and not serials:
        raise RevocationError("nothing to revoke: name an identity or at least one serial")
    store.check_revocations_secret()
    ca, bundle = store.fetch_ca(), store.fetch_trust_bundle()
    crls = store.fetch_revocations(bundle)  # verified: a list we cannot trust is not built upon
    lines: list[str] = []
    if identity is not None:
        found = store.certificates_of(identity)
        if not found:
            raise RevocationError(f"{store.name(identity.secret_suffix)} holds no certificate to revoke")
        fresh = _fresh_leaf(store, ca, bundle, identity, found, leaf_lifetime_hours, now)
        lines.append(
            f"replaced {store.name(identity.secret_suffix)}: new leaf {describe_certificate(fresh)}, "
            f"expires {fresh.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )
        for version, certificate in found:
            if certificate.not_valid_after_utc < now:
                continue  # expired: refused anyway
            if certificate.issuer != ca.certificate.subject:
                lines.append(
                    f"cannot revoke version {version} ({describe_certificate(certificate)}): issued by "
                    f"{certificate.issuer.rfc4514_string()}, not the issuing CA; it expires "
                    f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
                )
                continue
            serials.append(certificate.serial_number)
    already = Revocations.verified(crls, bundle, store.name(names.CA_REVOCATIONS_SECRET))
    issuer = ca.certificate.subject.public_bytes()
    new = sorted({s for s in serials if (issuer, s) not in already.entries})
    crls, retired = of_bundle(crls, bundle)
    lines += [f"dropped the list of {crl.issuer.rfc4514_string()}, a CA no longer trusted" for crl in retired]
    if new or retired:
        store.write_revocations(replace_list(crls, ca, new, now) if new else crls)
    lines += [f"revoked serial {serial:x}" for serial in new]
    lines += [f"already revoked: serial {s:x}" for s in sorted(set(serials) - set(new))]
    lines.append(
        f"{store.name(names.CA_REVOCATIONS_SECRET)}: {len(already) + len(new)} revoked in all; every server "
        f"refuses them from its next refresh ({names.ENV_REFRESH_SECONDS}, default 300 s)"
    )
    return Revoked(tuple(new), tuple(lines))


def _fresh_leaf(
    store: RevocationStore,
    ca: CertificateAuthority,
    bundle: list[x509.Certificate],
    identity: names.Identity,
    found: list[tuple[str, x509.Certificate]],
    lifetime_hours: float | None,
    now: dt.datetime,
) -> x509.Certificate:
    """Issue and store the identity's replacement before anything is revoked: its tasks need a leaf."""
    current = store.fetch_identity(identity).certificate
    if lifetime_hours is None:  # the lifetime the current leaf was issued with
        issued = current.not_valid_before_utc + CLOCK_SKEW_ALLOWANCE
        lifetime_hours = (current.not_valid_after_utc - issued).total_seconds() / 3600
    options = reissue_options(identity, current, store.environment)
    tls = ca.issue(store.environment, identity, lifetime_hours=lifetime_hours, now=now, **options)
    verify_for(identity, tls, bundle, store.environment, now)
    try:
        store.put_identity(identity, tls)
    except SecretStoreError as exc:
        raise RevocationError(f"nothing revoked: the fresh leaf could not be stored: {exc}") from exc
    return tls.certificate


def parse_serial(text: str) -> int:
    """A serial as `certs inspect`, the logs and `openssl x509 -serial` print it (hex; colons allowed)."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        serial = int(cleaned, 16)
    except ValueError:
        raise ValueError(f"--serial {text!r}: expected a hexadecimal serial such as 3f9a1c...") from None
    if not 0 < serial < 2**160:
        raise ValueError(f"--serial {text!r}: a certificate serial is a positive number of at most 20 bytes")
    return serial


__all__ = ["RevocationError", "RevocationStore", "Revoked", "parse_serial", "revoke"]
