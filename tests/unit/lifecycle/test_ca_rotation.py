"""The CA secrets' rotation against moto: the rollover, one due step per rotation, run in-process.

Time: the handler takes `now`; the test deploys a CA made 1,450 days ago (375 of its 1,825 days
left) and walks the rollover from 20 days ago to today, so every certificate it makes is valid on
the real clock too (the throwaway handshakes in testSecret run real OpenSSL).
"""

from __future__ import annotations

import datetime as dt
import json

import pytest

from runtime import names
from runtime.certificates import pem
from runtime.certificates.certset import verify_for
from runtime.certificates.issuance import DEFAULT_CA_LIFETIME_DAYS, CertificateAuthority
from runtime.lifecycle import (
    CA_SOURCE_IMPORTED,
    CA_SOURCE_ISSUED,
    ENV_CA_ROLLOVER_START_DAYS,
    ENV_CA_ROLLOVER_WAIT_DAYS,
    ENV_CA_SOURCE,
    ENV_LEAF_LIFETIME_HOURS,
    ca_rotation,
    issuance,
)
from runtime.lifecycle.rotation_steps import RotationError
from runtime.secrets import rollover
from tests.conftest import REGION
from tests.support.lifecycle import (
    ENVIRONMENT,
    create_shells,
    current_version,
    rotate,
    rotation_function,
    stages,
)

CA_NEXT = names.secret_name(ENVIRONMENT, names.CA_NEXT_SECRET)
CA_KEY = names.secret_name(ENVIRONMENT, names.CA_KEY_SECRET)
CA_CERT = names.secret_name(ENVIRONMENT, names.CA_BUNDLE_SECRET)
NOW = dt.datetime.now(dt.UTC)
CA_AGE_DAYS = 1450
START_DAYS, WAIT_DAYS = 400, 7


def days_ago(days: float) -> dt.datetime:
    return NOW - dt.timedelta(days=days)


@pytest.fixture
def aged(secretsmanager, monkeypatch):
    """An environment whose CA has 375 days left; leaves issued 60 days ago; the stack's settings."""
    monkeypatch.setenv(ENV_CA_ROLLOVER_START_DAYS, str(START_DAYS))
    monkeypatch.setenv(ENV_CA_ROLLOVER_WAIT_DAYS, str(WAIT_DAYS))
    monkeypatch.setenv(ENV_CA_SOURCE, CA_SOURCE_ISSUED)
    monkeypatch.setenv(ENV_LEAF_LIFETIME_HOURS, str(90 * 24))  # days apart, as the rollover steps are
    create_shells(secretsmanager)
    ca = CertificateAuthority.create(
        ENVIRONMENT, common_name="Hokusai MLflow CA old", now=days_ago(CA_AGE_DAYS)
    )
    secretsmanager.put_secret_value(SecretId=CA_KEY, SecretString=ca.identity.to_secret_string())
    secretsmanager.put_secret_value(SecretId=CA_CERT, SecretString=pem.bundle_pem([ca.certificate]).decode())
    issuance.ensure_certificates(
        secretsmanager, issuance.Settings(ENVIRONMENT, leaf_lifetime_hours=300 * 24), now=days_ago(60)
    )
    return secretsmanager, rotation_function(REGION), ca


def rotate_ca(client, function, secret_id: str, at: dt.datetime, **options) -> dict:
    return rotate(client, function, secret_id, ca_rotation.handler, now=at, **options)


def value(client, secret_id: str) -> str:
    return client.get_secret_value(SecretId=secret_id)["SecretString"]


def snapshot(client) -> dict[str, str]:
    suffixes = [names.CA_NEXT_SECRET, names.CA_KEY_SECRET, names.CA_BUNDLE_SECRET]
    suffixes += [identity.secret_suffix for identity in names.IDENTITIES]
    return {suffix: value(client, names.secret_name(ENVIRONMENT, suffix)) for suffix in suffixes}


def state(client, at: dt.datetime) -> rollover.State:
    return rollover.read_state(rollover.RolloverStore(ENVIRONMENT, client=client), at)


def test_the_whole_rollover_happens_by_schedule_each_step_only_when_due(aged):
    client, function, old = aged

    # 425 days left: nothing is due; every CA secret keeps its value (a new version of the same).
    before = snapshot(client)
    for secret_id in (CA_NEXT, CA_KEY, CA_CERT):
        previous = current_version(client, secret_id)
        rotate_ca(client, function, secret_id, days_ago(50))
        assert current_version(client, secret_id) != previous
    assert snapshot(client) == before
    assert json.loads(value(client, CA_NEXT)) == rollover.NO_NEXT_CA

    # 395 days left: begin. ca-key-next gets a new CA; the bundle trusts old and new; old issues.
    rotate_ca(client, function, CA_NEXT, days_ago(20))
    begun = state(client, days_ago(20))
    assert begun.phase == rollover.BEGUN
    new = begun.next_ca.certificate
    assert begun.bundle == [old.certificate, new]
    assert begun.issuer.certificate == old.certificate
    assert (new.not_valid_after_utc - new.not_valid_before_utc).days >= DEFAULT_CA_LIFETIME_DAYS
    assert {i.issuer for i in begun.identities} == {old.certificate}

    # A second begin and an early switch or finish are not due: nothing changes.
    before = snapshot(client)
    rotate_ca(client, function, CA_NEXT, days_ago(19))
    rotate_ca(client, function, CA_KEY, days_ago(15))  # trusted for 5 of 7 days
    rotate_ca(client, function, CA_CERT, days_ago(15))  # not switched yet
    assert snapshot(client) == before

    # 10 days after begin: switch. The new CA issues; every identity is re-issued from it.
    rotate_ca(client, function, CA_KEY, days_ago(10))
    switched = state(client, days_ago(10))
    assert switched.phase == rollover.SWITCHED
    assert switched.issuer.certificate == new
    assert switched.next_ca is None
    assert json.loads(value(client, CA_NEXT)) == rollover.NO_NEXT_CA
    assert switched.bundle == [old.certificate, new]
    for entry in switched.identities:
        assert entry.problem is None and entry.issuer == new
        assert (
            90 <= (entry.certificate.not_valid_after_utc - entry.certificate.not_valid_before_utc).days <= 91
        )

    # 5 days on the new leaves: finish is not due; 10 days: finish drops the old CA.
    before = snapshot(client)
    rotate_ca(client, function, CA_CERT, days_ago(5))
    assert snapshot(client) == before
    rotate_ca(client, function, CA_CERT, NOW)
    finished = state(client, NOW)
    assert finished.phase == rollover.STEADY
    assert finished.bundle == [new]
    for identity, entry in zip(names.IDENTITIES, finished.identities, strict=True):
        store = rollover.RolloverStore(ENVIRONMENT, client=client)
        verify_for(identity, store.fetch_identity(identity), [new], ENVIRONMENT)
        assert entry.issuer == new


def test_an_imported_ca_is_never_rolled_over_automatically(aged, monkeypatch):
    client, function, _ = aged
    monkeypatch.setenv(ENV_CA_SOURCE, CA_SOURCE_IMPORTED)
    before = snapshot(client)

    rotate_ca(client, function, CA_NEXT, days_ago(1))  # 376 days left: due, were it ours

    assert snapshot(client) == before
    assert state(client, NOW).phase == rollover.STEADY


def test_a_due_begin_with_a_broken_identity_fails_and_changes_nothing(aged):
    client, function, _ = aged
    worker = names.identity_secret_name(ENVIRONMENT, names.WORKER)
    client.put_secret_value(SecretId=worker, SecretString='{"schema": 1, "certificate": "garbage"}')
    before = snapshot(client)
    previous = current_version(client, CA_NEXT)

    with pytest.raises(RotationError, match=r"`begin` is due but refused.*fix these identities.*worker"):
        rotate_ca(client, function, CA_NEXT, days_ago(20))

    assert current_version(client, CA_NEXT) == previous
    assert snapshot(client) == before


def test_a_pending_bundle_that_drops_the_issuer_fails_the_test_step(aged):
    client, function, old = aged
    stranger = CertificateAuthority.create(ENVIRONMENT, common_name="Not ours")

    def replace_pending(step):
        if step == "testSecret":
            pending = next(v for v, s in stages(client, CA_CERT).items() if "AWSPENDING" in s)
            client.put_secret_value(
                SecretId=CA_CERT,
                ClientRequestToken=pending,
                SecretString=pem.bundle_pem([stranger.certificate]).decode(),
                VersionStages=["AWSPENDING"],
            )

    previous = current_version(client, CA_CERT)
    with pytest.raises(RotationError, match="testSecret.*drops.*Hokusai MLflow CA old"):
        rotate_ca(client, function, CA_CERT, NOW, before_step=replace_pending)
    assert current_version(client, CA_CERT) == previous
    assert pem.load_certificates(value(client, CA_CERT), CA_CERT) == [old.certificate]


def test_a_begin_interrupted_after_its_promotion_is_completed_by_the_next_rotation(aged, monkeypatch):
    client, function, old = aged
    real_begin = rollover.begin
    monkeypatch.setattr(rollover, "begin", lambda *a, **k: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError, match="crash"):
        rotate_ca(client, function, CA_NEXT, days_ago(20))
    half = state(client, days_ago(20))
    assert half.next_ca is not None and half.bundle == [old.certificate]  # key stored, not trusted

    monkeypatch.setattr(rollover, "begin", real_begin)
    rotate_ca(client, function, CA_CERT, days_ago(19))  # another secret's rotation leaves it alone
    assert state(client, days_ago(19)).bundle == [old.certificate]
    rotate_ca(client, function, CA_NEXT, days_ago(19))  # its own next rotation completes it

    resumed = state(client, days_ago(19))
    assert resumed.bundle == [old.certificate, half.next_ca.certificate]
    assert resumed.issuer.certificate == old.certificate


def test_identity_secrets_and_foreign_names_are_refused(aged):
    client, _, _ = aged
    api = names.identity_secret_name(ENVIRONMENT, names.API)
    event = {"Step": "createSecret", "SecretId": api, "ClientRequestToken": current_version(client, api)}
    with pytest.raises(RotationError, match="refusing to rotate .*api-identity"):
        ca_rotation.handler(event, None, client=client)


@pytest.mark.parametrize(
    ("variable", "raw", "message"),
    [
        (ENV_CA_ROLLOVER_START_DAYS, "", "not a whole number"),
        (ENV_CA_ROLLOVER_WAIT_DAYS, "0", "at least 1"),
        (ENV_CA_SOURCE, "borrowed", "expected one of issued, imported"),
    ],
)
def test_missing_or_bad_settings_fail_with_the_variable_named(aged, monkeypatch, variable, raw, message):
    client, function, _ = aged
    monkeypatch.setenv(variable, raw)
    at = days_ago(20) if variable != ENV_CA_ROLLOVER_WAIT_DAYS else NOW
    secret_id = CA_NEXT if variable != ENV_CA_ROLLOVER_WAIT_DAYS else CA_KEY
    if variable == ENV_CA_ROLLOVER_WAIT_DAYS:
        rotate_ca(client, function, CA_NEXT, days_ago(20))  # begun: the switch reads the wait
    with pytest.raises(RotationError, match=f"{variable}.*{message}"):
        rotate_ca(client, function, secret_id, at)
