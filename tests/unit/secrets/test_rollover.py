"""CA rollover steps against moto: the order they enforce, and that a rerun completes or refuses."""

from __future__ import annotations

import pytest

from runtime import cli, names
from runtime.certificates.certset import CertificateSet
from runtime.certificates.inspection import ip_addresses
from runtime.secrets import rollover
from runtime.secrets.rollover import RolloverError, RolloverStore

ENV = "staging"


@pytest.fixture
def store(secretsmanager, staging_set) -> RolloverStore:
    store = RolloverStore(ENV, client=secretsmanager)
    store.upload(staging_set)
    return store


def versions(client, suffix: str) -> int:
    return len(client.list_secret_version_ids(SecretId=names.secret_name(ENV, suffix))["Versions"])


def test_status_of_a_steady_environment(store, staging_set):
    state = rollover.status(store)
    assert state.phase == rollover.STEADY
    assert state.bundle == staging_set.trust_bundle
    assert state.next_ca is None
    assert all(i.issuer == staging_set.ca.certificate for i in state.identities)
    text = "\n".join(state.lines())
    assert "no rollover in progress" in text
    assert f"key id {rollover.key_id(staging_set.ca.certificate)}" in text


def test_the_whole_rollover(store, staging_set, secretsmanager):
    old = staging_set.ca.certificate
    rollover.begin(store)
    state = rollover.status(store)
    assert state.phase == rollover.BEGUN
    new = state.next_ca.certificate
    assert state.bundle == [old, new]
    assert state.issuer.certificate == old
    assert all(i.issuer == old for i in state.identities)  # nothing re-issued yet

    rollover.switch(store)
    state = rollover.status(store)
    assert state.phase == rollover.SWITCHED
    assert state.issuer.certificate == new
    assert state.next_ca is None
    assert all(i.issuer == new and i.problem is None for i in state.identities)
    server = store.fetch_identity(names.SERVER).certificate
    assert ip_addresses(server) == ["127.0.0.1"]  # the server's extra names survive the re-issue

    rollover.finish(store)
    state = rollover.status(store)
    assert state.phase == rollover.STEADY
    assert state.bundle == [new]
    before = {s: versions(secretsmanager, s) for s in (names.CA_BUNDLE_SECRET, names.CA_KEY_SECRET)}
    assert rollover.finish(store)[0].startswith("nothing to finish")
    assert {s: versions(secretsmanager, s) for s in before} == before


def test_begin_twice_is_refused(store):
    rollover.begin(store)
    with pytest.raises(RolloverError, match="already in progress.*begun"):
        rollover.begin(store)


def test_begin_during_a_switched_rollover_is_refused(store):
    rollover.begin(store)
    rollover.switch(store)
    with pytest.raises(RolloverError, match="already in progress.*run `finish`"):
        rollover.begin(store)


def test_an_interrupted_begin_resumes_with_the_same_new_ca(store, staging_set, monkeypatch):
    real = RolloverStore.write

    def crash_on_bundle(self, suffix, *args):
        if suffix == names.CA_BUNDLE_SECRET:
            raise RuntimeError("interrupted")
        return real(self, suffix, *args)

    monkeypatch.setattr(RolloverStore, "write", crash_on_bundle)
    with pytest.raises(RuntimeError):
        rollover.begin(store)
    monkeypatch.setattr(RolloverStore, "write", real)
    stored = store.fetch_next_ca().certificate
    assert rollover.status(store).bundle == staging_set.trust_bundle  # not trusted yet
    assert any("resuming" in line for line in rollover.begin(store))
    assert rollover.status(store).bundle == [staging_set.ca.certificate, stored]


def test_switch_before_begin_is_refused(store, secretsmanager):
    before = versions(secretsmanager, names.CA_KEY_SECRET)
    with pytest.raises(RolloverError, match="run `begin` first"):
        rollover.switch(store)
    assert versions(secretsmanager, names.CA_KEY_SECRET) == before


def test_switch_refuses_a_bundle_without_the_new_ca(store, staging_set):
    stranger = CertificateSet.issue(ENV).ca
    store.write(names.CA_NEXT_SECRET, stranger.identity.to_secret_string(), "ca-key-next", None)
    with pytest.raises(RolloverError, match="does not contain the new CA"):
        rollover.switch(store)
    assert store.fetch_ca().certificate == staging_set.ca.certificate


def test_switch_again_reissues_only_what_is_left(store, staging_set, secretsmanager):
    rollover.begin(store)
    rollover.switch(store)
    # the rotation Lambda (or a stale upload) puts an old-CA leaf back on one identity
    secretsmanager.put_secret_value(
        SecretId=names.identity_secret_name(ENV, names.WORKER),
        SecretString=staging_set.identities["worker"].to_secret_string(),
    )
    with pytest.raises(RolloverError, match="worker-identity .*issued by CN=Hokusai MLflow CA staging"):
        rollover.finish(store)
    counts = {i.name: versions(secretsmanager, i.secret_suffix) for i in names.IDENTITIES}
    lines = rollover.switch(store)
    assert [line.split()[0] for line in lines] == ["unchanged", "unchanged", "reissued"]
    assert versions(secretsmanager, names.WORKER.secret_suffix) == counts["worker"] + 1
    assert versions(secretsmanager, names.API.secret_suffix) == counts["api"]
    rollover.finish(store)


def test_finish_too_early_is_refused(store, staging_set):
    rollover.begin(store)
    with pytest.raises(RolloverError, match="too early to finish.*run `switch` first"):
        rollover.finish(store)
    assert len(rollover.status(store).bundle) == 2


def test_a_broken_identity_blocks_begin(store, secretsmanager):
    foreign = CertificateSet.issue(ENV).identities["api"]
    secretsmanager.put_secret_value(
        SecretId=names.identity_secret_name(ENV, names.API), SecretString=foreign.to_secret_string()
    )
    with pytest.raises(RolloverError, match="fix these identities.*api.*untrusted-issuer"):
        rollover.begin(store)


def test_the_cli_drives_the_rollover(store, capsys):
    assert cli.main(["certs", "rollover", "status", "--env", ENV]) == 0
    assert "phase: no rollover in progress" in capsys.readouterr().out
    assert cli.main(["certs", "rollover", "switch", "--env", ENV]) == 1
    assert "error [rollover-refused]" in capsys.readouterr().err
    for step in ("begin", "switch", "finish"):
        assert cli.main(["-q", "certs", "rollover", step, "--env", ENV]) == 0
    out = capsys.readouterr().out
    assert "published hokusai/staging/mlflow/ca-cert with 2 CAs" in out
    assert "reissued hokusai/staging/mlflow/server-identity" in out
    assert out.rstrip().endswith("phase now: no rollover in progress: one CA in the bundle, and it issues")
