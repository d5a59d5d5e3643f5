"""First issuance as a CloudFormation custom resource (the CDK Provider framework's `onEvent`).

On Create and Update it makes sure the environment has a CA and a valid identity per service,
writing straight into the secrets the stack created (empty shells at first), so no private key
passes through the template, the CDK process or a developer's disk. It never replaces what is
valid: a second Create/Update adds no secret version. Delete does nothing; the stack's removal
policy decides about the secrets.

Importing a CA: an operator uploads `ca-key` and `ca-cert` (`hokusai-mtls certs upload`) before
the first deploy; the handler finds a CA there and issues from it. With `CaSource: imported` (the
stack's `caSource` setting) an empty `ca-key` fails the deployment instead of getting a CA of
ours: the platform's CA is expected, and a self-made one would be trusted by nobody else.

`ca-key-next` gets the "no rollover" marker if empty, so the CA rotation has a current value.

A CA that is present but unreadable, expired or not in `ca-cert` fails the deployment instead of
being replaced: a new CA silently breaks trust for every running service, and a tampered or
mistyped import deserves an operator's eyes. Leaves are cheap and re-issued when invalid.

Event (ResourceProperties arrive as strings, as CloudFormation sends them)::

    {"RequestType": "Create" | "Update" | "Delete",
     "ResourceProperties": {"Environment": "staging", "LeafLifetimeHours": "24",
                            "ServerSans": ["localhost"], "KeyType": "ecdsa-p256",
                            "CaSource": "issued"}}
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError
from cryptography import x509

from runtime import names
from runtime.certificates import pem
from runtime.certificates.certset import check_ca_environment, verify_for
from runtime.certificates.identity import TLSIdentity
from runtime.certificates.issuance import CertificateAuthority, KeyType, check_leaf_lifetime
from runtime.certificates.verification import check_validity
from runtime.errors import (
    CertificateError,
    CertificateSetError,
    LifetimeError,
    SecretContentError,
    SecretNotFoundError,
)
from runtime.lifecycle import CA_SOURCE_IMPORTED, CA_SOURCE_ISSUED, CA_SOURCES
from runtime.lifecycle.clients import secrets_client
from runtime.secrets.rollover import NO_NEXT_CA
from runtime.secrets.secret_store import SecretStore, translate

log = logging.getLogger("hokusai_mtls")


@dataclass(frozen=True)
class Settings:
    """What the custom resource's properties ask for."""

    environment: str
    leaf_lifetime_hours: float | None = None
    server_sans: tuple[str, ...] = ()
    key_type: KeyType = KeyType.ECDSA_P256
    ca_source: str = CA_SOURCE_ISSUED

    @classmethod
    def from_properties(cls, properties: Mapping) -> Settings:
        try:
            environment = names.check_environment(str(properties["Environment"]))
        except KeyError:
            raise ValueError("ResourceProperties.Environment is required") from None
        lifetime = properties.get("LeafLifetimeHours")
        sans = properties.get("ServerSans") or ()
        ca_source = properties.get("CaSource") or CA_SOURCE_ISSUED
        if ca_source not in CA_SOURCES:
            raise ValueError(
                f"invalid ResourceProperties: CaSource {ca_source!r}; expected one of {', '.join(CA_SOURCES)}"
            )
        if isinstance(sans, str):
            raise ValueError("ResourceProperties.ServerSans must be a list of names, not a string")
        try:
            return cls(
                environment,
                check_leaf_lifetime(float(lifetime)) if lifetime is not None and lifetime != "" else None,
                tuple(str(s) for s in sans),
                KeyType(properties.get("KeyType") or KeyType.ECDSA_P256.value),
                ca_source,
            )
        except (ValueError, LifetimeError) as exc:
            raise ValueError(f"invalid ResourceProperties: {exc}") from exc


def physical_resource_id(environment: str) -> str:
    return f"hokusai-mtls-{environment}-certificates"


MAX_REPORTED_IDENTITIES = 12
"""Up to this many identities, the response's Data names each one's serial, expiry and action; beyond, it
counts the actions (`IdentityActions`: `issued=2,kept=38`), since CloudFormation refuses a custom
resource response over 4 KiB (about 200 bytes an identity). The log always names every one."""


def handler(event, context, *, client=None) -> dict:
    """CDK Provider `onEvent`: returns PhysicalResourceId and Data (serials and dates, never keys)."""
    request = event.get("RequestType")
    if request == "Delete":
        environment = event.get("ResourceProperties", {}).get("Environment", "unknown")
        return {"PhysicalResourceId": event.get("PhysicalResourceId") or physical_resource_id(environment)}
    if request not in ("Create", "Update"):
        raise ValueError(f"unknown RequestType {request!r}; expected Create, Update or Delete")
    settings = Settings.from_properties(event.get("ResourceProperties", {}))
    return {
        "PhysicalResourceId": physical_resource_id(settings.environment),
        "Data": ensure_certificates(client or secrets_client(), settings),
    }


def ensure_certificates(client, settings: Settings, *, now: dt.datetime | None = None) -> dict:
    """Issue whatever is missing or invalid; return what each secret now holds (no key material)."""
    now = now or dt.datetime.now(dt.UTC)
    store = _Store(settings.environment, client=client)
    ca, ca_action = _ensure_ca(store, settings, now)
    bundle = _ensure_bundle(store, ca)
    store.fill_if_empty(store.name(names.CA_NEXT_SECRET), json.dumps(NO_NEXT_CA))
    data = {"CaSerial": f"{ca.certificate.serial_number:x}", "CaAction": ca_action}
    data["CaNotAfter"] = _iso(ca.certificate.not_valid_after_utc)
    identities = store.catalog.identities
    actions: dict[str, int] = {}
    for identity in identities:
        tls, action = _ensure_identity(store, settings, ca, bundle, identity, now)
        actions[action] = actions.get(action, 0) + 1
        log.info(
            "%s: %s, serial %x, valid until %s",
            names.identity_secret_name(settings.environment, identity),
            action,
            tls.certificate.serial_number,
            _iso(tls.certificate.not_valid_after_utc),
        )
        if len(identities) > MAX_REPORTED_IDENTITIES:
            continue
        key = identity.name.capitalize()
        data[f"{key}Serial"] = f"{tls.certificate.serial_number:x}"
        data[f"{key}NotAfter"] = _iso(tls.certificate.not_valid_after_utc)
        data[f"{key}Action"] = action
    if len(identities) > MAX_REPORTED_IDENTITIES:
        data["IdentityActions"] = ",".join(f"{action}={count}" for action, count in sorted(actions.items()))
    return data


def _ensure_ca(store: _Store, settings: Settings, now: dt.datetime) -> tuple[CertificateAuthority, str]:
    secret_id = store.name(names.CA_KEY_SECRET)
    try:
        ca = store.fetch_ca()
    except SecretNotFoundError:
        if settings.ca_source == CA_SOURCE_IMPORTED:
            raise SecretContentError(
                secret_id,
                "is empty, and this environment's CA is imported (caSource: imported): upload the "
                "platform's CA first (`hokusai-mtls certs upload --env "
                f"{settings.environment} --dir DIR`, docs/MTLS_CERTIFICATE_MANAGEMENT.md), then deploy again",
            ) from None
        ca = CertificateAuthority.create(settings.environment, key_type=settings.key_type, now=now)
        store.put(secret_id, ca.identity.to_secret_string())
        log.info("issued a new CA %s into %s", ca.certificate.subject.rfc4514_string(), secret_id)
        return ca, "issued"
    try:
        check_validity(ca.certificate, secret_id, now)
        check_ca_environment(ca.certificate, settings.environment)
    except CertificateError as exc:
        raise SecretContentError(secret_id, f"{exc}; roll the CA over by hand (see the docs)") from exc
    return ca, "kept"


def _ensure_bundle(store: _Store, ca: CertificateAuthority) -> list[x509.Certificate]:
    secret_id = store.name(names.CA_BUNDLE_SECRET)
    try:
        bundle = store.fetch_trust_bundle()
    except SecretNotFoundError:
        bundle = [ca.certificate]
        store.put(secret_id, pem.bundle_pem(bundle).decode())
        return bundle
    if ca.certificate not in bundle:
        raise CertificateSetError(
            f"secret {secret_id}: the issuing CA {ca.certificate.subject.rfc4514_string()} from "
            f"{store.name(names.CA_KEY_SECRET)} is not in the trust bundle; upload both together"
        )
    return bundle


def _ensure_identity(
    store: _Store,
    settings: Settings,
    ca: CertificateAuthority,
    bundle: Sequence[x509.Certificate],
    identity: names.Identity,
    now: dt.datetime,
) -> tuple[TLSIdentity, str]:
    secret_id = store.name(identity.secret_suffix)
    try:
        current = store.fetch_identity(identity)
        verify_for(identity, current, bundle, settings.environment, now)
        return current, "kept"
    except SecretNotFoundError:
        action = "issued"
    except (SecretContentError, CertificateError) as exc:
        log.warning("re-issuing %s: the current value is not valid (%s)", secret_id, exc)
        action = "reissued"
    tls = ca.issue(
        settings.environment,
        identity,
        key_type=settings.key_type,
        lifetime_hours=settings.leaf_lifetime_hours,
        now=now,
        **({"extra_sans": settings.server_sans} if identity.serves else {}),
    )
    store.put(secret_id, tls.to_secret_string())
    log.info("%s %s serial %x into %s", action, identity.name, tls.certificate.serial_number, secret_id)
    return tls, action


class _Store(SecretStore):
    """The reading `SecretStore` plus the one write issuance needs."""

    def put(self, secret_id: str, value: str) -> None:
        """A new AWSCURRENT version of an existing secret (the stack owns the secrets; we fill them)."""
        try:
            self._client.put_secret_value(SecretId=secret_id, SecretString=value)
        except (ClientError, BotoCoreError) as exc:
            raise translate(secret_id, exc) from exc

    def fill_if_empty(self, secret_id: str, value: str) -> None:
        try:
            self._get(secret_id)
        except SecretNotFoundError:
            self.put(secret_id, value)


def _iso(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
