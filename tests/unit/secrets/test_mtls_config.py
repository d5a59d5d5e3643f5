"""Loading a role's certificates (the seed's tests/unit/test_mtls_config.py), against moto.

Covers the security levels per environment, fail-closed staging/production, the loud
development fallback, what the files and the printed environment look like, and that a
failed load never replaces the previous good set.
"""

from __future__ import annotations

import logging
import os
import stat

import pytest

from runtime import names
from runtime.certificates import pem
from runtime.certificates.certset import CertificateSet
from runtime.certificates.verification import verify_identity
from runtime.errors import LoadError
from runtime.secrets.loader import SOURCE_DEV_CA, SOURCE_SECRETS, LoaderSettings, load_certificates
from runtime.secrets.mlflow_config import configure_internal_mtls
from runtime.secrets.secret_store import SecretStore
from runtime.security_level import SecurityLevel
from tests.support.certs import new_ca


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def staging_store(secretsmanager, staging_set) -> SecretStore:
    store = SecretStore("staging", client=secretsmanager)
    store.upload(staging_set)
    return store


def settings(environment="staging", role="api", tmp_path=None, **kw) -> LoaderSettings:
    return LoaderSettings(environment=environment, role=role, cert_dir=tmp_path / "certs", **kw)


class StoreThatMustNotBeUsed:
    def __getattr__(self, name):
        raise AssertionError(f"the rollback must not touch Secrets Manager (called {name})")


# --- MTLS from Secrets Manager -------------------------------------------------------
def test_client_role_gets_mtls_files_with_private_modes(staging_store, staging_set, tmp_path):
    result = load_certificates(settings(tmp_path=tmp_path), store=staging_store)
    assert (result.level, result.source) == (SecurityLevel.MTLS, SOURCE_SECRETS)
    directory = tmp_path / "certs"
    assert mode(directory) == 0o700
    assert mode(directory / names.KEY_FILE) == 0o600
    assert mode(directory / names.COMBINED_PEM_FILE) == 0o600
    combined = (directory / names.COMBINED_PEM_FILE).read_bytes()
    api = staging_set.identities["api"]
    assert pem.load_certificates(combined.split(b"-----BEGIN PRIVATE KEY")[0], "pem") == [api.certificate]
    assert api.private_key_pem() in combined
    assert (
        pem.load_certificates((directory / names.CA_BUNDLE_FILE).read_bytes(), "ca")
        == staging_set.trust_bundle
    )


def test_client_exports_are_exactly_what_mlflow_reads(staging_store, tmp_path):
    result = load_certificates(settings(tmp_path=tmp_path), store=staging_store)
    directory = tmp_path / "certs"
    exports = result.exports()
    assert exports["MLFLOW_TRACKING_CLIENT_CERT_PATH"] == str(directory / "tls.pem")
    assert exports["MLFLOW_TRACKING_SERVER_CERT_PATH"] == str(directory / "ca.crt")
    assert exports["MLFLOW_TRACKING_INSECURE_TLS"] is None  # unset: never disable verification
    assert exports["HOKUSAI_MTLS_SECURITY_LEVEL"] == "MTLS"
    assert "MLFLOW_TRACKING_CLIENT_KEY_PATH" not in exports  # the seed's invented variable
    shell = result.shell().splitlines()
    assert f"export MLFLOW_TRACKING_CLIENT_CERT_PATH={directory / 'tls.pem'}" in shell
    assert "unset MLFLOW_TRACKING_INSECURE_TLS" in shell


def test_server_role_gets_its_own_identity_and_the_bundle(staging_store, staging_set, tmp_path):
    result = load_certificates(settings(role="mlflow-server", tmp_path=tmp_path), store=staging_store)
    directory = tmp_path / "certs"
    exports = result.exports()
    assert exports["HOKUSAI_MTLS_SERVER_CERT_FILE"] == str(directory / "tls.crt")
    assert exports["HOKUSAI_MTLS_SERVER_KEY_FILE"] == str(directory / "tls.key")
    assert exports["HOKUSAI_MTLS_CA_BUNDLE_FILE"] == str(directory / "ca.crt")
    served = pem.load_certificate((directory / "tls.crt").read_bytes(), "tls.crt")
    assert served == staging_set.identities["server"].certificate
    assert not (directory / "tls.pem").exists()


def test_secret_names_set_by_the_stack_override_the_defaults(secretsmanager, staging_set, tmp_path):
    secretsmanager.create_secret(
        Name="custom/bundle", SecretString=pem.bundle_pem(staging_set.trust_bundle).decode()
    )
    secretsmanager.create_secret(
        Name="custom/api", SecretString=staging_set.identities["api"].to_secret_string()
    )
    environ = {
        "ENVIRONMENT": "staging",
        names.ENV_CA_BUNDLE_SECRET: "custom/bundle",
        names.ENV_IDENTITY_SECRET: "custom/api",
        names.ENV_CERT_DIR: str(tmp_path / "c"),
    }
    result = load_certificates(
        LoaderSettings.from_environ(environ, role="api"), store=SecretStore("staging", client=secretsmanager)
    )
    assert result.level is SecurityLevel.MTLS
    assert result.identity.certificate == staging_set.identities["api"].certificate


def test_a_relative_cert_dir_exports_absolute_paths(staging_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = load_certificates(LoaderSettings("staging", "api", cert_dir="rel"), store=staging_store)
    assert result.exports()["MLFLOW_TRACKING_SERVER_CERT_PATH"] == str(tmp_path / "rel" / "ca.crt")


def test_role_directories_default_to_the_seed_paths():
    assert LoaderSettings("staging", "mlflow-server").directory.as_posix() == "/etc/mlflow/certs"
    assert LoaderSettings("staging", "worker").directory.as_posix() == "/tmp/mlflow-certs"


def test_the_level_is_logged_once_without_key_material(staging_store, staging_set, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="hokusai_mtls")
    load_certificates(settings(tmp_path=tmp_path), store=staging_store)
    level_lines = [r.getMessage() for r in caplog.records if "security level" in r.getMessage()]
    assert len(level_lines) == 1
    assert "MTLS for role api in staging" in level_lines[0]
    assert "PRIVATE KEY" not in caplog.text
    assert staging_set.identities["api"].private_key_pem().decode().splitlines()[1] not in caplog.text


# --- staging/production fail closed ------------------------------------------------------
def test_missing_secrets_stop_staging_and_name_them(secretsmanager, tmp_path):
    store = SecretStore("staging", client=secretsmanager)
    with pytest.raises(LoadError, match="hokusai/staging/mlflow/ca-cert: not found.*api-identity: not found"):
        load_certificates(settings(tmp_path=tmp_path), store=store)
    assert not (tmp_path / "certs").exists()


def test_an_invalid_certificate_stops_production_and_keeps_the_previous_set(secretsmanager, tmp_path):
    good = CertificateSet.issue("production")
    store = SecretStore("production", client=secretsmanager)
    store.upload(good)
    load_certificates(settings("production", tmp_path=tmp_path), store=store)
    before = {p.name: p.read_bytes() for p in (tmp_path / "certs").iterdir() if not p.name.startswith("..")}

    foreign = new_ca("production").issue("production", names.API)  # valid PEM, wrong CA
    secretsmanager.put_secret_value(
        SecretId="hokusai/production/mlflow/api-identity", SecretString=foreign.to_secret_string()
    )
    with pytest.raises(
        LoadError,
        match=r"previous files .* are untouched.*\[untrusted-issuer\] hokusai/production/mlflow/api-identity",
    ):
        load_certificates(settings("production", tmp_path=tmp_path), store=store)
    after = {p.name: p.read_bytes() for p in (tmp_path / "certs").iterdir() if not p.name.startswith("..")}
    assert after == before


def test_rollback_switch_is_insecure_explicitly_and_fetches_nothing(tmp_path):
    result = load_certificates(
        settings("production", tmp_path=tmp_path, enable_mtls=False), store=StoreThatMustNotBeUsed()
    )
    assert result.level is SecurityLevel.INSECURE
    assert result.exports()["MLFLOW_TRACKING_CLIENT_CERT_PATH"] is None
    assert result.exports()["MLFLOW_TRACKING_SERVER_CERT_PATH"] is None


# --- development degrades, loudly ---------------------------------------------------------
def test_development_without_secrets_uses_a_shared_local_ca(secretsmanager, tmp_path, caplog):
    store = SecretStore("development", client=secretsmanager)
    server = load_certificates(
        settings("development", "mlflow-server", tmp_path / "s", dev_ca_dir=tmp_path / "ca"), store=store
    )
    api = load_certificates(
        settings("development", "api", tmp_path / "a", dev_ca_dir=tmp_path / "ca"), store=store
    )
    assert (server.level, server.source) == (SecurityLevel.MTLS, SOURCE_DEV_CA)
    assert (api.level, api.source) == (SecurityLevel.MTLS, SOURCE_DEV_CA)
    assert "DEVELOPMENT FALLBACK" in caplog.text
    # both came from one CA, so the two services trust each other
    bundle = pem.load_certificates((tmp_path / "a" / "certs" / "ca.crt").read_bytes(), "ca")
    verify_identity(server.identity, bundle, kind=names.Kind.SERVER, hostname="127.0.0.1")
    assert mode(tmp_path / "ca" / "development" / "ca.key") == 0o600


def test_development_with_only_the_bundle_gives_a_client_tls(secretsmanager, development_set, tmp_path):
    secretsmanager.create_secret(
        Name="hokusai/development/mlflow/ca-cert",
        SecretString=pem.bundle_pem(development_set.trust_bundle).decode(),
    )
    result = load_certificates(
        settings("development", tmp_path=tmp_path), store=SecretStore("development", client=secretsmanager)
    )
    assert result.level is SecurityLevel.TLS
    assert result.exports()["MLFLOW_TRACKING_CLIENT_CERT_PATH"] is None
    assert result.exports()["MLFLOW_TRACKING_SERVER_CERT_PATH"] == str(tmp_path / "certs" / "ca.crt")
    assert "api-identity: not found" in " ".join(result.problems)


def test_development_with_no_writable_ca_directory_runs_insecure(secretsmanager, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = load_certificates(
        settings("development", tmp_path=tmp_path, dev_ca_dir=blocker),
        store=SecretStore("development", client=secretsmanager),
    )
    assert result.level is SecurityLevel.INSECURE


# --- settings from the environment -------------------------------------------------------
def test_settings_need_an_environment():
    with pytest.raises(ValueError, match="ENVIRONMENT is not set"):
        LoaderSettings.from_environ({}, role="api")


def test_enable_flag_must_be_a_boolean_word():
    with pytest.raises(ValueError, match="ENABLE_MTLS_AUTH='maybe' is not a boolean"):
        LoaderSettings.from_environ({"ENVIRONMENT": "staging", "ENABLE_MTLS_AUTH": "maybe"}, role="api")


def test_unknown_role_and_environment_are_named():
    with pytest.raises(ValueError, match="unknown role 'db'"):
        LoaderSettings("staging", "db")
    with pytest.raises(ValueError, match="environment 'prod!' is not a valid name"):
        LoaderSettings("prod!", "api")


# --- configure_internal_mtls (the API service, in-process) -------------------------------
def test_configure_internal_mtls_sets_mlflow_variables_once(staging_store, tmp_path, monkeypatch):
    environ = {
        "ENVIRONMENT": "staging",
        names.ENV_CERT_DIR: str(tmp_path / "c"),
        "MLFLOW_TRACKING_INSECURE_TLS": "true",
    }
    calls = []
    original = staging_store.fetch_identity
    monkeypatch.setattr(staging_store, "fetch_identity", lambda *a, **k: calls.append(a) or original(*a, **k))

    first = configure_internal_mtls(environ=environ, store=staging_store)
    second = configure_internal_mtls(environ=environ, store=staging_store)
    assert second is first and len(calls) == 1
    assert environ["MLFLOW_TRACKING_CLIENT_CERT_PATH"] == str(tmp_path / "c" / "tls.pem")
    assert environ["MLFLOW_TRACKING_SERVER_CERT_PATH"] == str(tmp_path / "c" / "ca.crt")
    assert "MLFLOW_TRACKING_INSECURE_TLS" not in environ

    configure_internal_mtls(environ=environ, store=staging_store, reload=True)
    assert len(calls) == 2


def test_configure_internal_mtls_rollback_clears_stale_variables(tmp_path):
    environ = {
        "ENVIRONMENT": "production",
        "ENABLE_MTLS_AUTH": "false",
        "MLFLOW_TRACKING_CLIENT_CERT_PATH": "/old/tls.pem",
    }
    result = configure_internal_mtls(environ=environ, store=StoreThatMustNotBeUsed())
    assert result.level is SecurityLevel.INSECURE
    assert "MLFLOW_TRACKING_CLIENT_CERT_PATH" not in environ
