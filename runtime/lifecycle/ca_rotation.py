"""Secrets Manager rotation of the CA secrets: the CA rollover (`runtime.secrets.rollover`), one step a time.

A CA cannot be rotated the way a leaf is: a new CA in `ca-key` that no service trusts yet breaks
every handshake. So each CA secret's rotation stands for the rollover step that changes it, and
takes that step only when it is due; a rotation that is not due stores the current value again
(the new version is the same content) after re-checking it, so a schedule is also a check:

- `ca-key-next`  -> `begin`   due when the issuing CA has at most START days left (and the CA is
                               ours: an imported CA is the platform's to roll over). New value:
                               a fresh CA. After finishSecret: publish `ca-cert` = old + new.
- `ca-key`       -> `switch`  due when the next CA has been in the bundle for WAIT days (every
                               service has loaded it). New value: the next CA. After
                               finishSecret: `ca-key-next` gets the marker and every identity is
                               re-issued from the new CA.
- `ca-cert`      -> `finish`  due when every identity has been on the new CA for WAIT days (every
                               service has loaded its new leaf). New value: the new CA alone.

"Since when" is read from the certificates themselves (the next CA's and the re-issued leaves'
notBefore, i.e. when the previous step made them, minus the 5-minute clock-skew allowance), so
the rollover needs no state of its own and each step refuses, as `certs rollover` does, when the
secrets are not in the state it needs. A step's second half (after finishSecret) writes other
secrets only, never the one being rotated; if it stops half way (a crash, a throttle), the next
rotation of the same secret completes it, due or not.

The schedule runs every WAIT days on each of the three secrets, so a rollover takes between
2 x WAIT and about 4 x WAIT days from begin to finish; the settings check that the CA still
outlives every leaf issued meanwhile (START > leaf lifetime + 3 x WAIT).

Environment: `runtime.lifecycle.ENV_CA_ROLLOVER_START_DAYS`, `ENV_CA_ROLLOVER_WAIT_DAYS`,
`ENV_CA_SOURCE`, `ENV_LEAF_LIFETIME_HOURS` (the re-issued leaves' lifetime).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import ssl

from cryptography import x509

from runtime import json_input, names
from runtime.certificates import pem
from runtime.certificates.certset import check_ca_environment, verify_for
from runtime.certificates.identity import TLSIdentity
from runtime.certificates.issuance import DEFAULT_CA_LIFETIME_DAYS, CertificateAuthority
from runtime.certificates.verification import check_trust_bundle, check_validity
from runtime.errors import MtlsError
from runtime.lifecycle import (
    CA_SOURCE_IMPORTED,
    CA_SOURCES,
    ENV_CA_ROLLOVER_START_DAYS,
    ENV_CA_ROLLOVER_WAIT_DAYS,
    ENV_CA_SOURCE,
)
from runtime.lifecycle.clients import secrets_client
from runtime.lifecycle.rotation import handshake, leaf_lifetime_hours
from runtime.lifecycle.rotation_steps import RotationError, current_value, run_step
from runtime.secrets import rollover

log = logging.getLogger("hokusai_mtls")

STEP_OF_SECRET = {
    names.CA_NEXT_SECRET: "begin",
    names.CA_KEY_SECRET: "switch",
    names.CA_BUNDLE_SECRET: "finish",
}
_CA_SECRET = re.compile(
    r"^hokusai/(?P<environment>[a-z]+)/mlflow/(?P<suffix>" + "|".join(map(re.escape, STEP_OF_SECRET)) + r")$"
)


def handler(event, context, *, client=None, now: dt.datetime | None = None) -> None:
    """Secrets Manager's rotation entry point for `ca-key-next`, `ca-key` and `ca-cert`."""
    client = client or secrets_client()
    run_step(event, client, lambda name: CaRotation(name, client, now=now))


class CaRotation:
    """One rotation of one CA secret: its rollover step if due, else the same value re-checked."""

    def __init__(self, secret_name: str, client, *, now: dt.datetime | None = None) -> None:
        match = _CA_SECRET.match(secret_name)
        try:
            if match is None:
                raise ValueError("not a CA secret")
            environment = names.check_environment(match["environment"])
        except ValueError as exc:
            raise RotationError(
                f"refusing to rotate {secret_name}: this function rotates only "
                f"hokusai/<env>/mlflow/{{{','.join(STEP_OF_SECRET)}}} ({exc})"
            ) from None
        self.secret_id = secret_name
        self.suffix = match["suffix"]
        self.step = STEP_OF_SECRET[self.suffix]
        self._client = client
        self._store = rollover.RolloverStore(environment, client=client)
        self._now = now

    @property
    def now(self) -> dt.datetime:
        return self._now or dt.datetime.now(dt.UTC)

    # --- the protocol ----------------------------------------------------------------------
    def create(self) -> str:
        state = self._state()
        due = {"begin": self._begin, "switch": self._switch, "finish": self._finish}[self.step]
        try:
            value = due(state)
        except MtlsError as exc:
            raise RotationError(
                f"createSecret {self.secret_id}: `{self.step}` is due but refused: {exc}"
            ) from exc
        if value is None:
            return self._unchanged()
        log.info("createSecret %s: rollover step `%s` is due; new value made", self.secret_id, self.step)
        return value

    def test(self, value: str, token: str) -> None:
        source = f"{self.secret_id} (AWSPENDING {token})"
        state = self._state()
        try:
            if self.suffix == names.CA_BUNDLE_SECRET:
                self._test_bundle(state, pem.load_certificates(value, source))
            elif not (self.suffix == names.CA_NEXT_SECRET and _is_marker(value)):
                self._test_ca(state, CertificateAuthority(TLSIdentity.from_secret_string(value, source)))
        except (MtlsError, ssl.SSLError) as exc:
            raise RotationError(f"testSecret {self.secret_id}: the pending value fails: {exc}") from exc

    def after_finish(self) -> None:
        """Complete this secret's step once its new value is current, or an earlier run's that
        stopped half way: `ca-key-next` -> publish the two-CA bundle (begin); `ca-key` -> the
        marker and the re-issue (switch). Never a write to the secret being rotated."""
        state = self._state()
        try:
            if (
                self.suffix == names.CA_NEXT_SECRET
                and state.next_ca
                and state.next_ca.certificate not in state.bundle
            ):
                done = rollover.begin(self._store, now=self._now)
            elif self.suffix == names.CA_KEY_SECRET and _switch_unfinished(state):
                done = rollover.switch(self._store, leaf_lifetime_hours=leaf_lifetime_hours(), now=self._now)
            else:
                return
        except MtlsError as exc:
            raise RotationError(
                f"finishSecret {self.secret_id}: completing `{self.step}` failed: {exc}"
            ) from exc
        for line in done:
            log.info("finishSecret %s: %s", self.secret_id, line)

    # --- the steps: the new value if due, else None -------------------------------------------
    def _begin(self, state: rollover.State) -> str | None:
        days_left = (state.issuer.certificate.not_valid_after_utc - self.now).days
        start = _days(ENV_CA_ROLLOVER_START_DAYS)
        if state.phase != rollover.STEADY:
            self._not_due(f"a rollover is in progress ({rollover.PHASES[state.phase]})")
            return None
        if days_left > start:
            self._not_due(f"the issuing CA has {days_left} days left; a rollover begins at {start}")
            return None
        if _ca_source() == CA_SOURCE_IMPORTED:
            log.warning(
                "%s: the imported CA has %d days left; roll it over with the platform's new CA "
                "(docs/MTLS_CERTIFICATE_MANAGEMENT.md); an imported CA is never replaced automatically",
                self.secret_id,
                days_left,
            )
            return None
        rollover.check_begin(self._store, state, self.now)
        new = rollover.new_ca(self._store, state, ca_lifetime_days=DEFAULT_CA_LIFETIME_DAYS, now=self.now)
        log.info(
            "begin: the issuing CA has %d days left; next CA %s", days_left, rollover.label(new.certificate)
        )
        return new.identity.to_secret_string()

    def _switch(self, state: rollover.State) -> str | None:
        # BEGUN is the phase with a next CA; the `is None` test says so to the type checker
        if (
            state.next_ca is None
            or state.phase != rollover.BEGUN
            or state.next_ca.certificate not in state.bundle
        ):
            self._not_due(f"no trusted next CA to switch to ({rollover.PHASES[state.phase]})")
            return None
        waited = self._waited(state.next_ca.certificate)
        if waited is not None:
            self._not_due(f"the next CA has been trusted for {waited}")
            return None
        check_validity(state.next_ca.certificate, self._store.name(names.CA_NEXT_SECRET), self.now)
        return state.next_ca.identity.to_secret_string()

    def _finish(self, state: rollover.State) -> str | None:
        if state.phase != rollover.SWITCHED:
            self._not_due(f"no switched rollover to finish ({rollover.PHASES[state.phase]})")
            return None
        try:
            bundle = rollover.final_bundle(self._store, state, self.now)
        except rollover.RolloverError as exc:
            self._not_due(str(exc))
            return None
        for entry in state.identities:
            if entry.certificate is None:  # not reached: final_bundle refuses an identity with a problem
                self._not_due(f"{entry.secret_id} has no readable certificate")
                return None
            waited = self._waited(entry.certificate)
            if waited is not None:
                self._not_due(f"{entry.secret_id} has been on the new CA for {waited}")
                return None
        return pem.bundle_pem(bundle).decode()

    # --- tests of a pending value -----------------------------------------------------------------
    def _test_ca(self, state: rollover.State, ca: CertificateAuthority) -> None:
        check_validity(ca.certificate, self.secret_id, self.now)
        check_ca_environment(ca.certificate, self._store.environment)
        bundle = list(state.bundle)
        if self.suffix == names.CA_KEY_SECRET and ca.certificate not in bundle:
            raise RotationError(
                f"{rollover.label(ca.certificate)} is not in the trust bundle; "
                "the issuing CA must always be trusted"
            )
        if ca.certificate not in bundle:
            bundle.append(ca.certificate)  # a next CA: trusted once begin completes
        leaf = ca.issue_server(self._store.environment, lifetime_hours=1)
        handshake(names.SERVER, leaf, ca, bundle, self._store.environment)

    def _test_bundle(self, state: rollover.State, bundle: list[x509.Certificate]) -> None:
        check_trust_bundle(bundle, self.secret_id)
        for ca in bundle:
            check_ca_environment(ca, self._store.environment)
        # What the current bundle trusts and still issues, or will: the issuer, a begun next CA.
        needed = [
            ca.certificate for ca in (state.issuer, state.next_ca) if ca and ca.certificate in state.bundle
        ]
        missing = [rollover.label(ca) for ca in needed if ca not in bundle]
        if missing:
            raise RotationError(
                f"{self.secret_id}: the pending bundle drops {', '.join(missing)}, which must stay"
            )
        for identity in self._store.catalog.identities:
            verify_for(
                identity, self._store.fetch_identity(identity), bundle, self._store.environment, self.now
            )

    # --- helpers -----------------------------------------------------------------------------------
    def _state(self) -> rollover.State:
        try:
            return rollover.read_state(self._store, self.now)
        except MtlsError as exc:
            raise RotationError(f"{self.secret_id}: cannot read the CA secrets: {exc}") from exc

    def _unchanged(self) -> str:
        if self.suffix == names.CA_NEXT_SECRET and self._store.fetch_next_ca() is None:
            return json.dumps(rollover.NO_NEXT_CA)  # also fills a shell that was never written
        return current_value(self._client, self.secret_id)

    def _not_due(self, why: str) -> None:
        log.info("createSecret %s: `%s` is not due: %s; the value stays", self.secret_id, self.step, why)

    def _waited(self, certificate: x509.Certificate) -> str | None:
        """None once `certificate` was made WAIT days ago, else how long it has been."""
        age = self.now - certificate.not_valid_before_utc
        wait = dt.timedelta(days=_days(ENV_CA_ROLLOVER_WAIT_DAYS))
        return None if age >= wait else f"{age.days} of {wait.days} days"


def _switch_unfinished(state: rollover.State) -> bool:
    """`ca-key` holds the new CA, but `ca-key-next` still does too, or an identity is not on it."""
    if state.next_ca is not None:
        return state.next_ca.certificate == state.issuer.certificate
    return state.phase == rollover.SWITCHED and any(
        i.issuer != state.issuer.certificate for i in state.identities
    )


def _is_marker(value: str) -> bool:
    try:
        return json_input.loads(value) == rollover.NO_NEXT_CA
    except ValueError:
        return False


def _days(variable: str) -> int:
    value = os.environ.get(variable, "").strip()
    try:
        days = int(value)
    except ValueError:
        raise RotationError(
            f"{variable}={value!r} is not a whole number of days (the stack sets it)"
        ) from None
    if days < 1:
        raise RotationError(f"{variable}={days} must be at least 1")
    return days


def _ca_source() -> str:
    value = os.environ.get(ENV_CA_SOURCE, "").strip()
    if value not in CA_SOURCES:
        raise RotationError(f"{ENV_CA_SOURCE}={value!r}; expected one of {', '.join(CA_SOURCES)}")
    return value
