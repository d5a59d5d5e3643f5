"""`certs revoke` against moto, and what the loader makes of `ca-crl`.

An identity's revocation must give it a fresh leaf (same names) before its in-date certificates are
listed; a serial is listed alone; a rerun adds nothing; a list nobody can trust is never built upon and
never published to a server; clients do not need the list and never read it.
"""

from __future__ import annotations

import pytest

from runtime import cli, names
from runtime.certificates import pem
from runtime.certificates.inspection import dns_names, ip_addresses
from runtime.certificates.issuance import CertificateAuthority
from runtime.certificates.revocation import Revocations, with_revoked
from runtime.errors import RefreshError, SecretContentError
from runtime.secrets.loader import LoaderSettings, load_certificates
from runtime.secrets.revoke import RevocationError, RevocationStore, parse_serial, revoke
from tests.support.certs import forged_list

ENV = "staging"
CRL_SECRET = names.secret_name(ENV, names.CA_REVOCATIONS_SECRET)


@pytest.fixture
def store(secretsmanager, staging_set) -> RevocationStore:
    store = RevocationStore(ENV, client=secretsmanager)
    store.upload(staging_set)
    secretsmanager.create_secret(Name=CRL_SECRET, Description="the stack's empty shell")
    return store


def listed(store: RevocationStore) -> Revocations:
    bundle = store.fetch_trust_bundle()
    return Revocations.verified(store.fetch_revocations(bundle), bundle, CRL_SECRET)


def test_revoking_an_identity_replaces_its_leaf_then_lists_every_certificate_in_date(store, staging_set):
    old = staging_set.identities["server"].certificate
    rotated = staging_set.ca.issue(ENV, names.SERVER, extra_sans=("localhost", "127.0.0.1"))
    store.put_identity(names.SERVER, rotated)  # a rotation: the old leaf is AWSPREVIOUS, still in date
    result = revoke(store, identity=names.SERVER)

    fresh = store.fetch_identity(names.SERVER).certificate
    assert fresh.serial_number not in (old.serial_number, rotated.certificate.serial_number)
    assert dns_names(fresh) == dns_names(old) and ip_addresses(fresh) == ["127.0.0.1"]  # its names stay
    revocations = listed(store)
    assert revocations.refuses(old) and revocations.refuses(rotated.certificate)
    assert not revocations.refuses(fresh)
    assert not revocations.refuses(staging_set.identities["api"].certificate)
    assert set(result.serials) == {old.serial_number, rotated.certificate.serial_number}
    assert any(line.startswith("replaced hokusai/staging/mlflow/server-identity") for line in result.lines)


def test_a_serial_is_listed_alone_and_a_rerun_adds_nothing(store, staging_set):
    api = staging_set.identities["api"].certificate
    first = revoke(store, serials=[api.serial_number])
    assert first.serials == (api.serial_number,)
    assert store.fetch_identity(names.API).certificate == api  # --serial replaces no leaf
    versions = len(store._client.list_secret_version_ids(SecretId=CRL_SECRET)["Versions"])
    again = revoke(store, serials=[api.serial_number])
    assert again.serials == () and f"already revoked: serial {api.serial_number:x}" in again.lines
    assert len(store._client.list_secret_version_ids(SecretId=CRL_SECRET)["Versions"]) == versions
    worker = staging_set.identities["worker"].certificate
    revoke(store, serials=[worker.serial_number])
    assert listed(store).refuses(api) and listed(store).refuses(worker)  # the list only grows


def test_without_the_stacks_secret_nothing_is_changed(secretsmanager, staging_set):
    store = RevocationStore(ENV, client=secretsmanager)
    store.upload(staging_set)
    with pytest.raises(RevocationError, match="deploy this version's stacks first"):
        revoke(store, identity=names.API)
    assert store.fetch_identity(names.API).certificate == staging_set.identities["api"].certificate


def test_a_list_nobody_can_trust_is_not_built_upon(store, staging_set):
    store._client.put_secret_value(
        SecretId=CRL_SECRET, SecretString=pem.crls_pem([forged_list(staging_set.ca, [9])]).decode()
    )
    with pytest.raises(SecretContentError, match="no CA of that name in the trust bundle signed it"):
        revoke(store, identity=names.API)
    assert store.fetch_identity(names.API).certificate == staging_set.identities["api"].certificate


def test_the_server_loader_publishes_the_verified_list_and_refuses_a_forged_one(store, staging_set, tmp_path):
    settings = LoaderSettings(environment=ENV, role=names.SERVER.role, cert_dir=tmp_path / "server")
    load_certificates(settings, store=store)
    assert (tmp_path / "server" / names.REVOCATIONS_FILE).read_bytes() == b""  # nothing revoked yet
    api = staging_set.identities["api"].certificate
    revoke(store, serials=[api.serial_number])
    load_certificates(settings, store=store, refresh=True)
    published = (tmp_path / "server" / names.REVOCATIONS_FILE).read_bytes()
    assert Revocations.from_pem(published, staging_set.trust_bundle, "crl.pem").refuses(api)

    store._client.put_secret_value(
        SecretId=CRL_SECRET, SecretString=pem.crls_pem([forged_list(staging_set.ca, [9])]).decode()
    )
    with pytest.raises(RefreshError, match="ca-crl"):
        load_certificates(settings, store=store, refresh=True)
    assert (tmp_path / "server" / names.REVOCATIONS_FILE).read_bytes() == published  # the good set stays


def test_a_client_never_reads_the_list(store, tmp_path):
    store._client.put_secret_value(SecretId=CRL_SECRET, SecretString="garbage")
    settings = LoaderSettings(environment=ENV, role=names.API.role, cert_dir=tmp_path / "api")
    load_certificates(settings, store=store)  # the api's task role may not read ca-crl at all
    assert not (tmp_path / "api" / names.REVOCATIONS_FILE).exists()


@pytest.mark.parametrize(("text", "serial"), [("3f9a", 0x3F9A), ("0x3F9A", 0x3F9A), ("3f:9a", 0x3F9A)])
def test_serials_read_as_tools_print_them(text, serial):
    assert parse_serial(text) == serial


@pytest.mark.parametrize("text", ["", "xyz", "0", "-5", "f" * 41])
def test_bad_serials_are_named(text):
    with pytest.raises(ValueError, match="--serial"):
        parse_serial(text)


def test_the_command_needs_an_identity_or_a_serial(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["certs", "revoke", "--env", ENV])
    assert exit_.value.code == 2
    assert "--identity" in capsys.readouterr().err


def test_a_client_behind_a_forwarding_proxy_reads_the_list(store, staging_set, tmp_path):
    """The api behind an ALB in mTLS verify mode checks the leaves the ALB forwards: it needs the list."""
    worker = staging_set.identities["worker"].certificate
    revoke(store, serials=[worker.serial_number])
    settings = LoaderSettings.from_environ(
        {names.ENV_PROXY_KIND: names.PROXY_KIND_ALB},
        environment=ENV,
        role=names.API.role,
        cert_dir=tmp_path / "api",
    )
    load_certificates(settings, store=store)
    published = (tmp_path / "api" / names.REVOCATIONS_FILE).read_bytes()
    assert Revocations.from_pem(published, staging_set.trust_bundle, "crl.pem").refuses(worker)


def test_the_list_of_a_retired_ca_is_dropped_on_the_next_revocation(store, staging_set):
    retired = CertificateAuthority.create(ENV, common_name="Hokusai MLflow CA staging 2026-01-01")
    store._client.put_secret_value(
        SecretId=CRL_SECRET, SecretString=pem.crls_pem([with_revoked(retired, [9])]).decode()
    )
    result = revoke(store, serials=[staging_set.identities["api"].certificate.serial_number])
    assert any(
        line.startswith("dropped the list of CN=Hokusai MLflow CA staging 2026-01-01")
        for line in result.lines
    )
    remaining = pem.load_crls(store._get(CRL_SECRET), CRL_SECRET)
    assert [crl.issuer for crl in remaining] == [staging_set.ca.certificate.subject]


def test_a_version_pruned_between_listing_and_reading_is_skipped(store, staging_set):
    """Secrets Manager prunes old versions at any time: one gone since the listing revokes nothing."""
    from botocore.exceptions import ClientError

    rotated = staging_set.ca.issue(ENV, names.API)
    store.put_identity(names.API, rotated)  # two versions now: the original and `rotated`
    real = store._client

    class Pruning:
        def __getattr__(self, name):
            return getattr(real, name)

        def get_secret_value(self, **kwargs):
            if kwargs.get("VersionId") and kwargs["SecretId"].endswith("api-identity"):
                value = real.get_secret_value(**kwargs)
                if "AWSCURRENT" not in value.get("VersionStages", []):
                    raise ClientError({"Error": {"Code": "ResourceNotFoundException"}}, "GetSecretValue")
                return value
            return real.get_secret_value(**kwargs)

    store._client = Pruning()
    result = revoke(store, identity=names.API)
    assert result.serials == (rotated.certificate.serial_number,)  # the pruned original is not listed
