"""An environment's complete certificate set: trust bundle, issuing CA, and every identity.

This is the unit that is issued (`certs issue`), checked (`certs verify --dir`), and
uploaded (`certs upload`): it must verify as a whole before any of it leaves the machine.

Directory layout (what `certs issue --out DIR` writes and `certs upload --dir DIR` reads)::

    ca.crt              trust bundle (one or more CA certificates)
    ca.key              the issuing CA's key (0600; optional: may be kept elsewhere)
    <identity>.crt      leaf certificate, for identity in server, api, worker
    <identity>.key      its key (0600)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from runtime import names
from runtime.certificates import pem
from runtime.certificates.files import (
    PRIVATE_FILE_MODE,
    PUBLIC_FILE_MODE,
    ensure_private_dir,
    write_file_atomic,
)
from runtime.certificates.identity import TLSIdentity
from runtime.certificates.issuance import (
    DEFAULT_CA_LIFETIME_DAYS,
    ISSUER_ORGANIZATION,
    CertificateAuthority,
    KeyType,
)
from runtime.certificates.verification import check_trust_bundle, verify_identity
from runtime.errors import CertificateSetError, KeyMismatchError, OutputExistsError

BUNDLE_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"


def verify_for(
    identity: names.Identity,
    tls: TLSIdentity,
    bundle: Sequence[x509.Certificate],
    environment: str,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """Verify `tls` as `identity` of `environment`: the one verification of a role's certificates.

    `certs verify --dir`, `certs upload` (both through `CertificateSet.verify`) and the loader
    all call this, so none can accept what another refuses: every CA of the bundle belongs to
    `environment` (a development CA in production's bundle is refused), then the leaf is checked
    for its role: the server name for MLflow, the SPIFFE ID for clients.
    """
    for certificate in bundle:
        check_ca_environment(certificate, environment)
    # A server is checked for the name its callers dial; a caller for the SPIFFE ID it is known by;
    # a service that does both, for both.
    hostname = identity.hostname(environment) if identity.serves else None
    spiffe_id = names.spiffe_id(environment, identity.service) if identity.calls else None
    return verify_identity(tls, bundle, kind=identity.kind, hostname=hostname, spiffe_id=spiffe_id, now=now)


@dataclass
class CertificateSet:
    environment: str
    trust_bundle: list[x509.Certificate]
    identities: dict[str, TLSIdentity] = field(default_factory=dict)
    """Keyed by `names.Identity.name`."""
    ca: CertificateAuthority | None = None
    """The issuer; None when its key is kept elsewhere (only the bundle travels then)."""
    expected: tuple[names.Identity, ...] = names.IDENTITIES
    """The identities a complete set holds: the declared ones (`runtime.service_catalog`)."""

    @classmethod
    def issue(
        cls,
        environment: str,
        *,
        key_type: KeyType = KeyType.ECDSA_P256,
        leaf_lifetime_hours: float | None = None,
        ca_lifetime_days: int = DEFAULT_CA_LIFETIME_DAYS,
        server_sans: tuple[str, ...] = (),
        ca: CertificateAuthority | None = None,
        trust_bundle: Sequence[x509.Certificate] | None = None,
        identities: Iterable[names.Identity] = names.IDENTITIES,
        now: dt.datetime | None = None,
    ) -> CertificateSet:
        """A CA (new unless given) and a fresh leaf for each identity.

        With an existing `ca`, `trust_bundle` keeps the bundle it came with (during a rollover
        it holds two CAs); by default the bundle is the CA alone.
        """
        if ca is not None:
            check_ca_environment(ca.certificate, environment)
        ca = ca or CertificateAuthority.create(
            environment, key_type=key_type, lifetime_days=ca_lifetime_days, now=now
        )
        identities = tuple(identities)
        issued = {
            identity.name: ca.issue(
                environment,
                identity,
                key_type=key_type,
                lifetime_hours=leaf_lifetime_hours,
                now=now,
                **({"extra_sans": server_sans} if identity.serves else {}),
            )
            for identity in identities
        }
        return cls(environment, list(trust_bundle or [ca.certificate]), issued, ca, identities)

    def verify(self, now: dt.datetime | None = None) -> None:
        """Raise the first problem: missing identity, bad bundle, foreign CA key, any leaf failing."""
        names.check_environment(self.environment)
        check_trust_bundle(self.trust_bundle, BUNDLE_FILE)
        missing = [i.name for i in self.expected if i.name not in self.identities]
        if missing:
            raise CertificateSetError(f"the {self.environment} set lacks identities: {', '.join(missing)}")
        if self.ca is not None and self.ca.certificate not in self.trust_bundle:
            raise CertificateSetError(
                f"the issuing CA {self.ca.certificate.subject.rfc4514_string()} is not in the trust bundle"
            )
        for identity in self.expected:
            verify_for(identity, self.identities[identity.name], self.trust_bundle, self.environment, now)

    # --- directories ---------------------------------------------------------------
    def write_to_dir(self, directory: Path, *, overwrite: bool = False) -> list[Path]:
        """Write the set (keys 0600, directory 0700); refuse to clobber unless `overwrite`."""
        directory = ensure_private_dir(Path(directory))
        files: dict[str, tuple[bytes, int]] = {
            BUNDLE_FILE: (pem.bundle_pem(self.trust_bundle), PUBLIC_FILE_MODE)
        }
        if self.ca is not None:
            files[CA_KEY_FILE] = (self.ca.identity.private_key_pem(), PRIVATE_FILE_MODE)
        for name, tls in self.identities.items():
            files[f"{name}.crt"] = (tls.certificate_pem(), PUBLIC_FILE_MODE)
            files[f"{name}.key"] = (tls.private_key_pem(), PRIVATE_FILE_MODE)
        existing = [name for name in files if (directory / name).exists()]
        if existing and not overwrite:
            raise OutputExistsError(
                f"{directory} already holds {', '.join(existing)}; pass --force to overwrite"
            )
        return [write_file_atomic(directory / name, data, mode) for name, (data, mode) in files.items()]

    @classmethod
    def read_from_dir(
        cls, directory: Path, environment: str, identities: Sequence[names.Identity] = names.IDENTITIES
    ) -> CertificateSet:
        """Read what `write_to_dir` wrote (for the declared `identities`); every error names the file."""
        directory = Path(directory)
        bundle = pem.load_certificates(_read(directory / BUNDLE_FILE), str(directory / BUNDLE_FILE))
        found = {}
        for identity in identities:
            certificate, key = directory / f"{identity.name}.crt", directory / f"{identity.name}.key"
            if certificate.exists() or key.exists():
                found[identity.name] = TLSIdentity(
                    pem.load_certificate(_read(certificate), str(certificate)),
                    pem.load_private_key(_read(key), str(key)),
                    f"{directory / identity.name}.{{crt,key}}",
                )
        ca = None
        if (directory / CA_KEY_FILE).exists():
            ca = _ca_for_key(bundle, directory / CA_KEY_FILE)
        return cls(environment, bundle, found, ca, tuple(identities))


def check_ca_environment(certificate: x509.Certificate, environment: str) -> None:
    """Refuse a CA that our own issuance made for another environment (O=Hokusai, its OU names it).

    Any environment name counts (a `qa` CA in staging's bundle is refused); a CA imported from
    elsewhere carries no such mark and is accepted.
    """
    subject = certificate.subject
    organizations = {a.value for a in subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)}
    attributes = subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    units = {a.value for a in attributes if isinstance(a.value, str)}  # an OU is a string: bytes name none
    # Ours (O=Hokusai) name any environment in their OU; any CA naming one of the default three is refused
    # elsewhere, as before environments were declared.
    ours = ISSUER_ORGANIZATION in organizations
    others = sorted(
        u
        for u in units
        if u != environment and (u in names.ENVIRONMENTS or (ours and names.ENVIRONMENT_NAME.fullmatch(u)))
    )
    if others:
        raise CertificateSetError(
            f"the CA {certificate.subject.rfc4514_string()} belongs to {others[0]}, not {environment}; "
            "each environment has its own CA"
        )


def load_ca_dir(directory: Path) -> tuple[CertificateAuthority, list[x509.Certificate]]:
    """The issuing CA (the bundle certificate `ca.key` belongs to) and the whole bundle."""
    directory = Path(directory)
    bundle = pem.load_certificates(_read(directory / BUNDLE_FILE), str(directory / BUNDLE_FILE))
    return _ca_for_key(bundle, directory / CA_KEY_FILE), bundle


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertificateSetError(f"{path}: file missing") from None
    except OSError as exc:
        raise CertificateSetError(f"{path}: cannot read ({exc.strerror})") from exc


def _ca_for_key(bundle: list[x509.Certificate], key_path: Path) -> CertificateAuthority:
    """The issuing CA is the bundle certificate that `ca.key` belongs to."""
    key = pem.load_private_key(_read(key_path), str(key_path))
    for certificate in bundle:
        try:
            return CertificateAuthority(TLSIdentity(certificate, key, str(key_path)))
        except KeyMismatchError:
            continue
    raise KeyMismatchError(
        f"{key_path}: the key belongs to no certificate in {key_path.parent / BUNDLE_FILE}"
    )
