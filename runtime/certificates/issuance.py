"""Issue the environment's CA and its leaves with `cryptography`.

`CertificateAuthority` is the factory of leaves (as in trustme): `ca.issue_server(env)`,
`ca.issue_client(env, "api")`. Leaves carry what our verifier and Python's `ssl` demand:
SKI/AKI, critical basicConstraints and keyUsage, one EKU, and SANs (CN alone is
obsolete for hostnames, RFC 6125). Client leaves name their service with one SPIFFE URI SAN.
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import math

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from runtime import names
from runtime.certificates import pem
from runtime.certificates.identity import TLSIdentity
from runtime.certificates.inspection import extension, is_ca
from runtime.errors import LifetimeError, NotACertificateAuthorityError

DEFAULT_CA_LIFETIME_DAYS = names.CA_LIFETIME_DAYS
"""Long enough for many leaf rotations; CA rollover (docs) replaces it well before the end."""
SHORT_LEAF_LIFETIME_HOURS = names.SHORT_LEAF_LIFETIME_HOURS
MIN_LEAF_LIFETIME_HOURS = 1 / 60
"""One minute: the runtime issues leaves that short (compressed-time tests); the stacks ask for
hours (Secrets Manager rotates at most every 4 hours)."""
ISSUER_ORGANIZATION = "Hokusai"
"""The O of every certificate we issue; with the OU (the environment) it marks our CAs' environment."""
CLOCK_SKEW_ALLOWANCE = dt.timedelta(minutes=5)
"""notBefore is back-dated so a peer whose clock runs a little behind accepts a fresh leaf."""


class KeyType(enum.Enum):
    """Key algorithms we issue. ECDSA P-256 is the default: small, and fast to handshake."""

    ECDSA_P256 = "ecdsa-p256"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"

    def generate(self) -> pem.PrivateKey:
        if self is KeyType.ECDSA_P256:
            return ec.generate_private_key(ec.SECP256R1())
        return rsa.generate_private_key(public_exponent=65537, key_size=int(self.value.split("-")[1]))


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _subject_alternative_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


class CertificateAuthority:
    """An issuing CA: its certificate and private key."""

    def __init__(self, identity: TLSIdentity) -> None:
        if not is_ca(identity.certificate):
            raise NotACertificateAuthorityError(
                f"{identity.source}: {identity.certificate.subject.rfc4514_string()} is not a CA "
                "(basicConstraints CA:TRUE missing)"
            )
        self.identity = identity

    def __repr__(self) -> str:
        return f"CertificateAuthority({self.certificate.subject.rfc4514_string()!r})"

    @property
    def certificate(self) -> x509.Certificate:
        return self.identity.certificate

    @classmethod
    def create(
        cls,
        environment: str,
        *,
        key_type: KeyType = KeyType.ECDSA_P256,
        lifetime_days: int = DEFAULT_CA_LIFETIME_DAYS,
        common_name: str | None = None,
        now: dt.datetime | None = None,
    ) -> CertificateAuthority:
        """A new self-signed root for one environment (pathlen 0: it signs leaves only)."""
        names.check_environment(environment)
        _check_ca_lifetime(lifetime_days)
        key = key_type.generate()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ISSUER_ORGANIZATION),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, environment),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name or f"Hokusai MLflow CA {environment}"),
            ]
        )
        now = now or _utcnow()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW_ALLOWANCE)
            .not_valid_after(now + dt.timedelta(days=lifetime_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(TLSIdentity(certificate, key, f"CA {environment}"))

    @classmethod
    def from_pem(
        cls, certificate: bytes | str, private_key: bytes | str, source: str = "CA"
    ) -> CertificateAuthority:
        return cls(TLSIdentity.from_pem(certificate, private_key, source))

    # --- leaves ------------------------------------------------------------------
    def issue(self, environment: str, identity: names.Identity, **options) -> TLSIdentity:
        """Issue the leaf of any declared identity (`runtime.service_catalog`): a client certificate for a
        caller, a server certificate naming its Cloud Map name for a server, both usages for both."""
        if identity.kind is names.Kind.CLIENT:
            options.pop("extra_sans", None)
            return self.issue_client(environment, identity.service, **options)
        return self.issue_server(
            environment, service=identity.service, client_auth=identity.kind is names.Kind.BOTH, **options
        )

    def issue_server(
        self,
        environment: str,
        *,
        service: str = names.MLFLOW_SERVICE,
        client_auth: bool = False,
        extra_sans: tuple[str, ...] = (),
        key_type: KeyType = KeyType.ECDSA_P256,
        lifetime_hours: float | None = None,
        now: dt.datetime | None = None,
    ) -> TLSIdentity:
        """A server's certificate: DNS SAN `<service>.hokusai-<env>.local` (MLflow's by default; + extra DNS
        names or IPs) and the URI SAN `spiffe://hokusai/<env>/<service>`; `client_auth`: it calls too."""
        hostname = f"{service}.{names.cloud_map_namespace(environment)}"
        sans: list[x509.GeneralName] = [x509.DNSName(hostname)]
        sans += [_subject_alternative_name(s) for s in extra_sans if s != hostname]
        sans.append(x509.UniformResourceIdentifier(names.spiffe_id(environment, service)))
        usages = [
            ExtendedKeyUsageOID.SERVER_AUTH,
            *([ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else []),
        ]
        return self._issue_leaf(environment, hostname, sans, usages, key_type, lifetime_hours, now)

    def issue_client(
        self,
        environment: str,
        service: str,
        *,
        key_type: KeyType = KeyType.ECDSA_P256,
        lifetime_hours: float | None = None,
        now: dt.datetime | None = None,
    ) -> TLSIdentity:
        """A calling service's certificate: one URI SAN `spiffe://hokusai/<env>/<service>`, CN `service`."""
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(names.spiffe_id(environment, service))]
        return self._issue_leaf(
            environment, service, sans, [ExtendedKeyUsageOID.CLIENT_AUTH], key_type, lifetime_hours, now
        )

    def _issue_leaf(
        self,
        environment: str,
        common_name: str,
        sans: list[x509.GeneralName],
        usages: list[x509.ObjectIdentifier],
        key_type: KeyType,
        lifetime_hours: float | None,
        now: dt.datetime | None,
    ) -> TLSIdentity:
        names.check_environment(environment)
        hours = names.default_leaf_lifetime_hours(environment) if lifetime_hours is None else lifetime_hours
        check_leaf_lifetime(hours)
        now = now or _utcnow()
        end = now + dt.timedelta(hours=hours)
        if end > self.certificate.not_valid_after_utc:
            raise LifetimeError(
                f"a {hours:g}-hour leaf would outlive its CA {self.certificate.subject.rfc4514_string()}, "
                f"which expires {self.certificate.not_valid_after_utc:%Y-%m-%d}; roll the CA over first"
            )
        key = key_type.generate()
        issuer_ski = extension(self.certificate, x509.SubjectKeyIdentifier)
        aki = (
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski)
            if issuer_ski  # an imported CA may lack an SKI: derive the AKI from its key then
            # (the private key's public half: TLSIdentity checked it is the certificate's key, and
            # it is EC or RSA, a key that signs, which the certificate's key type does not say)
            else x509.AuthorityKeyIdentifier.from_issuer_public_key(self.identity.private_key.public_key())
        )
        certificate = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ISSUER_ORGANIZATION),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, environment),
                        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                    ]
                )
            )
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW_ALLOWANCE)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                _key_usage(digital_signature=True, key_encipherment=isinstance(key, rsa.RSAPrivateKey)),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(aki, critical=False)
            .sign(self.identity.private_key, hashes.SHA256())
        )
        return TLSIdentity(certificate, key, f"{common_name} ({environment})")


MAX_LIFETIME_DAYS = 100 * 365
"""No certificate of ours lives longer (a leaf never outlives its CA anyway): the bound keeps a typo
such as `--leaf-hours 1e12` a named LifetimeError instead of the date arithmetic's OverflowError."""


def _check_ca_lifetime(days: int) -> None:
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= MAX_LIFETIME_DAYS:
        raise LifetimeError(
            f"CA lifetime must be a positive whole number of days, at most {MAX_LIFETIME_DAYS}, got {days!r}"
        )


def check_leaf_lifetime(hours: float) -> float:
    """`hours` if it is a leaf lifetime we issue (finite, a minute to 100 years), else LifetimeError."""
    valid = isinstance(hours, int | float) and not isinstance(hours, bool) and math.isfinite(hours)
    if not valid or not MIN_LEAF_LIFETIME_HOURS <= hours <= MAX_LIFETIME_DAYS * 24:
        raise LifetimeError(
            f"leaf lifetime must be a number of hours, at least one minute (1/60) and at most "
            f"{MAX_LIFETIME_DAYS * 24} (100 years), got {hours!r}"
        )
    return hours


def _key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )
