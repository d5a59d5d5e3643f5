"""CA rollover in three steps, each refusing until the previous one holds (`certs rollover`).

A new CA cannot simply replace the old one: a peer that does not trust the CA of the certificate
it is shown refuses the handshake. So trust moves before issuance, and issuance before distrust:

1. `begin`   make a new CA; keep its key in `ca-key-next`; publish `ca-cert` = old + new.
             Every service must then load that bundle (servers within their refresh interval,
             clients when they restart) before anyone presents a leaf of the new CA.
2. `switch`  make the new CA the issuer (`ca-key` <- new, `ca-key-next` <- a marker, no CA) and
             re-issue every identity from it (a new version of each `<id>-identity`; the
             rotation Lambda issues from `ca-key` from now on, so from the new CA too).
             Every service must then load its new leaf.
3. `finish`  remove the old CA from `ca-cert`, refused while any identity's current certificate
             was issued by it. After services load that bundle, old-CA leaves are refused.

Each step reads and verifies everything first and writes only then; each can be run again after
an interruption and completes what is left (`begin` resumes a half-written begin; `switch`
re-issues only identities not yet on the new CA; `finish` on a one-CA bundle does nothing).
A step run out of order raises `RolloverError` naming what is wrong and what to run instead.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field

from botocore.exceptions import BotoCoreError, ClientError
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from runtime import json_input, names
from runtime.certificates import pem
from runtime.certificates.certset import check_ca_environment, verify_for
from runtime.certificates.identity import TLSIdentity
from runtime.certificates.inspection import dns_names, extension, ip_addresses
from runtime.certificates.issuance import DEFAULT_CA_LIFETIME_DAYS, CertificateAuthority, KeyType
from runtime.certificates.verification import check_trust_bundle, check_validity
from runtime.errors import CertificateError, MtlsError, SecretContentError, SecretNotFoundError
from runtime.secrets.secret_store import SecretStore, translate

log = logging.getLogger("hokusai_mtls")

NO_NEXT_CA = {"schema": names.SECRET_SCHEMA_VERSION, "rollover": "none"}
"""What `ca-key-next` holds outside a rollover (after `switch`): a marker, no key."""

STEADY, BEGUN, SWITCHED = "steady", "begun", "switched"
PHASES = {
    STEADY: "no rollover in progress: one CA in the bundle, and it issues",
    BEGUN: "begun: the bundle trusts old and new, the old CA still issues; next: `switch`",
    SWITCHED: "switched: the new CA issues, the bundle still trusts the old; next: `finish`",
}


class RolloverError(MtlsError):
    """A rollover step refused: the secrets are not in the state the step needs."""

    code = "rollover-refused"


def key_id(certificate: x509.Certificate) -> str:
    """The first 16 hex digits of the subject key identifier (two CAs may share a name)."""
    ski = extension(certificate, x509.SubjectKeyIdentifier)
    digest = ski.digest if ski else x509.SubjectKeyIdentifier.from_public_key(certificate.public_key()).digest
    return digest.hex()[:16]


def label(certificate: x509.Certificate) -> str:
    return f"{certificate.subject.rfc4514_string()} key id {key_id(certificate)}"


@dataclass
class IdentityState:
    name: str
    secret_id: str
    certificate: x509.Certificate | None = None
    issuer: x509.Certificate | None = None
    """The bundle CA that signed the current certificate; None if none did (or unreadable)."""
    problem: str | None = None


@dataclass
class State:
    """What the secrets hold now, read and checked, without writing anything."""

    environment: str
    bundle: list[x509.Certificate]
    issuer: CertificateAuthority
    """The CA in `ca-key`."""
    next_ca: CertificateAuthority | None
    """The CA in `ca-key-next`, or None (missing secret, or the marker)."""
    identities: list[IdentityState] = field(default_factory=list)

    @property
    def old(self) -> list[x509.Certificate]:
        """Bundle CAs that do not issue any more (nor will, after `switch`)."""
        keep = {self.issuer.certificate} | ({self.next_ca.certificate} if self.next_ca else set())
        return [c for c in self.bundle if c not in keep]

    @property
    def phase(self) -> str:
        if self.next_ca is not None:
            return BEGUN
        return SWITCHED if len(self.bundle) > 1 else STEADY

    def lines(self) -> list[str]:
        """`certs rollover status`: the phase, the bundle, who issues, who issued each identity."""
        out = [f"phase: {PHASES[self.phase]}", f"trust bundle ({len(self.bundle)} CA):"]
        for ca in self.bundle:
            roles = []
            if ca == self.issuer.certificate:
                roles.append(names.CA_KEY_SECRET)
            if self.next_ca is not None and ca == self.next_ca.certificate:
                roles.append(names.CA_NEXT_SECRET)
            held = f"  [{', '.join(roles)}]" if roles else ""
            out.append(f"  {label(ca)} expires {ca.not_valid_after_utc:%Y-%m-%d}{held}")
        out.append(f"{names.CA_KEY_SECRET}: {label(self.issuer.certificate)}")
        nxt = label(self.next_ca.certificate) if self.next_ca else "no CA (no rollover begun)"
        out.append(f"{names.CA_NEXT_SECRET}: {nxt}")
        out.append("identities:")
        for state in self.identities:
            # read_state sets the certificate and its issuer of every identity without a problem
            if state.problem or state.certificate is None or state.issuer is None:
                out.append(f"  {state.name:<7} PROBLEM: {state.problem}")
            else:
                out.append(
                    f"  {state.name:<7} serial {state.certificate.serial_number:x} issued by "
                    f"key id {key_id(state.issuer)}, expires {state.certificate.not_valid_after_utc:%Y-%m-%d}"
                )
        return out


class RolloverStore(SecretStore):
    """The reading `SecretStore` plus the writes a rollover needs."""

    def fetch_next_ca(self) -> CertificateAuthority | None:
        secret_id = self.name(names.CA_NEXT_SECRET)
        try:
            value = self._get(secret_id)
        except SecretNotFoundError:
            return None  # the secret does not exist yet, or the CDK's shell has no value
        try:
            document = json_input.loads(value)
        except ValueError:
            document = None  # not our marker: parse it as a CA below and name the problem
        if isinstance(document, dict) and document.get("rollover") == NO_NEXT_CA["rollover"]:
            return None
        try:
            tls = TLSIdentity.from_secret_string(value, secret_id)
            return CertificateAuthority(tls)
        except CertificateError as exc:
            raise SecretContentError(secret_id, str(exc)) from exc

    def write(self, suffix: str, value: str, content: str, certificate: x509.Certificate | None) -> str:
        """Store `value` as the current version (creating the secret if missing); the action taken."""
        return self._put(self.name(suffix), value, content, certificate, None).action

    def put_identity(self, identity: names.Identity, tls: TLSIdentity) -> None:
        secret_id = self.name(identity.secret_suffix)
        try:
            self._client.put_secret_value(SecretId=secret_id, SecretString=tls.to_secret_string())
        except (ClientError, BotoCoreError) as exc:
            raise translate(secret_id, exc) from exc


def read_state(store: RolloverStore, now: dt.datetime | None = None) -> State:
    """Read and check `ca-cert`, `ca-key`, `ca-key-next` and each identity (identities may be bad)."""
    now = now or dt.datetime.now(dt.UTC)
    bundle = store.fetch_trust_bundle()
    issuer = store.fetch_ca()
    next_ca = store.fetch_next_ca()
    bundle_id = store.name(names.CA_BUNDLE_SECRET)
    if issuer.certificate not in bundle:
        raise RolloverError(
            f"{store.name(names.CA_KEY_SECRET)} holds {label(issuer.certificate)}, which is not in "
            f"{bundle_id}; the issuing CA must always be trusted. Fix the secrets by hand first"
        )
    for ca in bundle:
        check_ca_environment(ca, store.environment)
    state = State(store.environment, bundle, issuer, next_ca)
    for identity in store.catalog.identities:
        entry = IdentityState(identity.name, store.name(identity.secret_suffix))
        try:
            tls = store.fetch_identity(identity)
            entry.certificate = tls.certificate
            entry.issuer = verify_for(identity, tls, bundle, store.environment, now)
        except MtlsError as exc:
            entry.problem = f"[{exc.code}] {exc}"
        state.identities.append(entry)
    return state


def status(store: RolloverStore) -> State:
    return read_state(store)


def check_begin(store: RolloverStore, state: State, now: dt.datetime) -> None:
    """Refuse a `begin` that would start a second rollover, or roll over broken identities."""
    if state.phase == SWITCHED:
        raise RolloverError(
            f"a rollover is already in progress ({PHASES[SWITCHED]}): the bundle holds "
            f"{len(state.bundle)} CAs; run `finish` before beginning another"
        )
    if state.next_ca is not None and state.next_ca.certificate in state.bundle:
        raise RolloverError(
            f"a rollover is already in progress ({PHASES[BEGUN]}): {names.CA_NEXT_SECRET} holds "
            f"{label(state.next_ca.certificate)}, already in the bundle"
        )
    broken = [f"{i.name}: {i.problem}" for i in state.identities if i.problem]
    if broken:
        raise RolloverError("fix these identities before a rollover: " + "; ".join(broken))
    check_validity(state.issuer.certificate, store.name(names.CA_KEY_SECRET), now)


def new_ca(
    store: RolloverStore, state: State, *, ca_lifetime_days: int, now: dt.datetime
) -> CertificateAuthority:
    """The next CA: same key algorithm as the issuer, named after the day it was made."""
    return CertificateAuthority.create(
        store.environment,
        key_type=_key_type(state.issuer.certificate),
        lifetime_days=ca_lifetime_days,
        common_name=f"Hokusai MLflow CA {store.environment} {now:%Y-%m-%d}",
        now=now,
    )


def begin(
    store: RolloverStore,
    *,
    ca_lifetime_days: int = DEFAULT_CA_LIFETIME_DAYS,
    now: dt.datetime | None = None,
) -> list[str]:
    """Create the new CA and trust it next to the old one. Returns what was done, line by line."""
    now = now or dt.datetime.now(dt.UTC)
    state = read_state(store, now)
    done: list[str] = []
    check_begin(store, state, now)
    if state.next_ca is None:
        new = new_ca(store, state, ca_lifetime_days=ca_lifetime_days, now=now)
        # The key first: a crash after this leaves a resumable begin, never a trusted CA without a key.
        store.write(names.CA_NEXT_SECRET, new.identity.to_secret_string(), "ca-key-next", new.certificate)
        done.append(f"created the new CA {label(new.certificate)} in {store.name(names.CA_NEXT_SECRET)}")
    else:
        new = state.next_ca  # an interrupted begin: the key is stored, the bundle not yet written
        done.append(f"resuming: {store.name(names.CA_NEXT_SECRET)} already holds {label(new.certificate)}")
    check_validity(new.certificate, store.name(names.CA_NEXT_SECRET), now)
    check_ca_environment(new.certificate, store.environment)
    bundle = [*state.bundle, new.certificate]
    check_trust_bundle(bundle, "the two-CA bundle")
    for identity in store.catalog.identities:  # every current leaf still verifies against the new bundle
        verify_for(identity, store.fetch_identity(identity), bundle, store.environment, now)
    store.write(names.CA_BUNDLE_SECRET, pem.bundle_pem(bundle).decode(), "trust-bundle", None)
    done.append(f"published {store.name(names.CA_BUNDLE_SECRET)} with {len(bundle)} CAs (old + new)")
    return done


def switch(
    store: RolloverStore,
    *,
    leaf_lifetime_hours: float | None = None,
    now: dt.datetime | None = None,
) -> list[str]:
    """Make the new CA the issuer, then re-issue every identity from it."""
    now = now or dt.datetime.now(dt.UTC)
    state = read_state(store, now)
    done: list[str] = []
    if state.phase == STEADY:
        raise RolloverError(
            f"no rollover to switch: {store.name(names.CA_NEXT_SECRET)} holds no CA and the bundle "
            f"holds one ({label(state.issuer.certificate)}); run `begin` first"
        )
    if state.next_ca is not None:
        new = state.next_ca
        if new.certificate not in state.bundle:
            raise RolloverError(
                f"the bundle in {store.name(names.CA_BUNDLE_SECRET)} does not contain the new CA "
                f"{label(new.certificate)}: `begin` did not finish; run `begin` again, let every service "
                "load the two-CA bundle, then `switch`"
            )
        check_validity(new.certificate, store.name(names.CA_NEXT_SECRET), now)
        if new.certificate != state.issuer.certificate:
            store.write(names.CA_KEY_SECRET, new.identity.to_secret_string(), "ca-key", new.certificate)
            done.append(f"{store.name(names.CA_KEY_SECRET)} now holds the new CA {label(new.certificate)}")
        store.write(names.CA_NEXT_SECRET, json.dumps(NO_NEXT_CA), "ca-key-next", None)
        done.append(f"{store.name(names.CA_NEXT_SECRET)} emptied (marker, no key)")
    issuer = state.next_ca or state.issuer
    for identity, entry in zip(store.catalog.identities, state.identities, strict=True):
        if entry.problem is None and entry.issuer == issuer.certificate:
            done.append(f"unchanged {entry.secret_id}: already issued by the new CA")
            continue
        options: dict = {"lifetime_hours": leaf_lifetime_hours, "now": now}
        if entry.certificate is not None:
            options.update(reissue_options(identity, entry.certificate, store.environment))
        tls = issuer.issue(store.environment, identity, **options)
        verify_for(identity, tls, state.bundle, store.environment, now)
        store.put_identity(identity, tls)
        done.append(
            f"reissued {entry.secret_id}: serial {tls.certificate.serial_number:x} from the new CA, "
            f"expires {tls.certificate.not_valid_after_utc:%Y-%m-%d}"
        )
    return done


def final_bundle(store: RolloverStore, state: State, now: dt.datetime) -> list[x509.Certificate]:
    """The bundle `finish` publishes (the issuer alone), once no identity depends on another CA."""
    if state.next_ca is not None:  # the BEGUN phase
        raise RolloverError(
            f"too early to finish: {store.name(names.CA_NEXT_SECRET)} still holds the new CA "
            f"{label(state.next_ca.certificate)}, which does not issue yet; run `switch` first"
        )
    issuer = state.issuer.certificate
    dependent = [
        f"{i.secret_id} ({i.problem or 'issued by ' + (label(i.issuer) if i.issuer else 'no bundle CA')})"
        for i in state.identities
        if i.problem is not None or i.issuer != issuer
    ]
    if dependent:
        raise RolloverError(
            "too early to finish: these identities are not (validly) issued by the new CA "
            f"{label(issuer)}: {'; '.join(dependent)}; run `switch` again"
        )
    bundle = [issuer]
    for identity in store.catalog.identities:
        verify_for(identity, store.fetch_identity(identity), bundle, store.environment, now)
    return bundle


def finish(store: RolloverStore, *, now: dt.datetime | None = None) -> list[str]:
    """Remove every CA but the issuer from the bundle, once no identity depends on another."""
    now = now or dt.datetime.now(dt.UTC)
    state = read_state(store, now)
    if state.phase == STEADY:
        return [f"nothing to finish: {store.name(names.CA_BUNDLE_SECRET)} holds only the issuing CA"]
    bundle = final_bundle(store, state, now)
    store.write(names.CA_BUNDLE_SECRET, pem.bundle_pem(bundle).decode(), "trust-bundle", None)
    removed = ", ".join(label(c) for c in state.old)
    return [f"published {store.name(names.CA_BUNDLE_SECRET)} with the new CA only; removed {removed}"]


def reissue_options(identity: names.Identity, certificate: x509.Certificate, environment: str) -> dict:
    """`CertificateAuthority.issue` options that keep what `certificate` has: its key type, and a
    server's names beyond its Cloud Map name."""
    options: dict = {"key_type": _key_type(certificate)}
    if identity.serves:
        options["extra_sans"] = _extra_sans(certificate, environment)
    return options


def _key_type(certificate: x509.Certificate) -> KeyType:
    """Keep the algorithm the certificate has (our CAs and leaves use ECDSA P-256 or RSA)."""
    key = certificate.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        try:
            return KeyType(f"rsa-{key.key_size}")
        except ValueError:
            return KeyType.RSA_3072
    if isinstance(key, ec.EllipticCurvePublicKey):
        return KeyType.ECDSA_P256
    return KeyType.ECDSA_P256


def _extra_sans(certificate: x509.Certificate, environment: str) -> tuple[str, ...]:
    """The server certificate's names beyond the Cloud Map name, kept on re-issue."""
    hostname = names.mlflow_hostname(environment)
    return tuple(n for n in [*dns_names(certificate), *ip_addresses(certificate)] if n != hostname)
