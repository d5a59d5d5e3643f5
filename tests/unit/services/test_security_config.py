"""AntiFragileSecurityConfig: seed 003's names over the catalog, the adaptive client and the loader's files.

Certificates are real: a CA per environment and leaves issued for the declared identities, published
in the loader's layout (ca.crt, tls.crt, tls.key, tls.pem) with the loader's `publish_files`.
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
from pathlib import Path

import httpx
import pytest

from runtime import names
from runtime.certificates import pem
from runtime.certificates.files import PRIVATE_FILE_MODE, PUBLIC_FILE_MODE, publish_files
from runtime.certificates.issuance import CertificateAuthority
from runtime.clients.adaptive_client import ClientTLS
from runtime.errors import ClientConfigError, LoadError
from runtime.security_level import SecurityLevel
from runtime.service_catalog import DEFAULT_CATALOG, catalog_from_environ
from runtime.services import security_config
from runtime.services.security_config import AntiFragileSecurityConfig

CONVERTER = "document-converter"
SECRET_VALUE = "do-not-show-this-secret-0123456789abcdef"
TASK_DEFINITION = Path(__file__).resolve().parents[3] / "constructs_lib" / "mtls_task_definition.py"


def services_json(**extra: dict) -> str:
    """HOKUSAI_MTLS_SERVICES: our three (DEFAULT_CATALOG) plus `extra`."""
    return json.dumps({**json.loads(DEFAULT_CATALOG.to_json()), **extra})


SERVICES = services_json(**{CONVERTER: {"serves": "mtls", "port": 8443, "callers": ["api"]}})
CATALOG = catalog_from_environ({names.ENV_SERVICES: SERVICES})


@pytest.fixture(scope="module")
def staging_ca() -> CertificateAuthority:
    return CertificateAuthority.create("staging")


@pytest.fixture(scope="module")
def development_ca() -> CertificateAuthority:
    return CertificateAuthority.create("development")


def publish(directory: Path, ca: CertificateAuthority, environment: str, service: str) -> None:
    """What the loader writes for `service`'s identity, issued by `ca` for `environment`."""
    identity = CATALOG.identity_of(service)
    assert identity is not None
    tls = ca.issue(environment, identity)
    publish_files(
        directory,
        {
            names.CA_BUNDLE_FILE: (pem.bundle_pem([ca.certificate]), PUBLIC_FILE_MODE),
            names.CERT_FILE: (tls.certificate_pem(), PUBLIC_FILE_MODE),
            names.KEY_FILE: (tls.private_key_pem(), PRIVATE_FILE_MODE),
            names.COMBINED_PEM_FILE: (tls.combined_pem(), PRIVATE_FILE_MODE),
        },
    )


@pytest.fixture
def cert_dir(tmp_path) -> Path:
    return tmp_path / "certs"


def environ(cert_dir: Path, environment: str = "staging", **extra: str) -> dict[str, str]:
    return {
        names.ENV_ENVIRONMENT: environment,
        names.ENV_SERVICES: SERVICES,
        names.ENV_CERT_DIR: str(cert_dir),
        **extra,
    }


def config(service: str, env: dict[str, str], environment: str | None = None) -> AntiFragileSecurityConfig:
    return AntiFragileSecurityConfig(service, environment, environ=env)


# --- the service and its identity -------------------------------------------------------------
def test_a_declared_service_gets_its_identity_and_directory(cert_dir):
    security = config("api", environ(cert_dir))
    assert (security.service_name, security.environment) == ("api", "staging")
    assert security.identity == CATALOG.identity_of("api")
    assert security.identity.kind is names.Kind.CLIENT
    assert security.certificate_dir == cert_dir.absolute()


def test_mlflow_runs_as_its_historic_server_identity_in_its_default_directory(cert_dir):
    env = environ(cert_dir)
    del env[names.ENV_CERT_DIR]
    security = config("mlflow", env)
    assert security.identity.name == names.SERVER.name
    assert security.certificate_dir == Path(names.SERVER_CERT_DIR)


def test_a_declared_server_with_callers_is_a_server_identity(cert_dir):
    security = config(CONVERTER, environ(cert_dir))
    assert security.identity.kind is names.Kind.SERVER
    assert security.identity.hostname("staging") == f"{CONVERTER}.hokusai-staging.local"


def test_an_undeclared_service_is_refused_by_name(cert_dir):
    with pytest.raises(ValueError, match=r"unknown service 'billing'.*declared: mlflow, api, worker"):
        config("billing", environ(cert_dir))


def test_a_declared_service_without_an_identity_is_refused(cert_dir):
    env = environ(cert_dir, **{names.ENV_SERVICES: services_json(reports={})})
    with pytest.raises(ValueError, match=r"service 'reports' has no identity"):
        config("reports", env)


def test_a_bad_catalog_names_the_variable(cert_dir):
    with pytest.raises(ValueError, match=names.ENV_SERVICES):
        config("api", environ(cert_dir, **{names.ENV_SERVICES: "{not json"}))


def test_repr_names_the_service_and_never_a_secret(cert_dir):
    env = environ(
        cert_dir, **{names.ENV_KEY_HASH_SECRET: SECRET_VALUE, names.ENV_CA_BUNDLE_SECRET: SECRET_VALUE}
    )
    text = repr(config("api", env))
    assert "service_name='api'" in text and "environment='staging'" in text and str(cert_dir) in text
    assert SECRET_VALUE not in text


# --- the environment ------------------------------------------------------------------------
def test_the_environment_comes_from_environ(cert_dir):
    assert config("api", environ(cert_dir, environment="qa")).environment == "qa"


def test_an_explicit_environment_wins_over_environ(cert_dir):
    assert config("api", environ(cert_dir, environment="qa"), "production").environment == "production"


def test_a_missing_environment_names_the_variable(cert_dir):
    env = environ(cert_dir)
    del env[names.ENV_ENVIRONMENT]
    with pytest.raises(ValueError, match=rf"^{names.ENV_ENVIRONMENT} is not set"):
        config("api", env)


@pytest.mark.parametrize("bad", ["Staging", "prod_1", "-dev", "x" * 25])
def test_a_bad_environment_name_in_environ_names_the_variable(cert_dir, bad):
    with pytest.raises(
        ValueError, match=rf"^{names.ENV_ENVIRONMENT}: environment '{bad}' is not a valid name"
    ):
        config("api", environ(cert_dir, environment=bad))


def test_a_bad_explicit_environment_is_refused(cert_dir):
    with pytest.raises(ValueError, match=r"environment 'Prod' is not a valid name"):
        config("api", environ(cert_dir), "Prod")


@pytest.mark.parametrize(
    ("variable", "value"), [(names.ENV_MAY_DEGRADE, "maybe"), (names.ENV_ENABLE_MTLS, "perhaps")]
)
def test_a_bad_flag_is_refused_at_construction(cert_dir, variable, value):
    with pytest.raises(ValueError, match=variable):
        config("api", environ(cert_dir, **{variable: value}))


@pytest.mark.parametrize(
    ("environment", "extra", "expected"),
    [
        ("development", {}, True),
        ("staging", {}, False),
        ("production", {}, False),
        ("staging", {names.ENV_MAY_DEGRADE: "true"}, True),
        ("development", {names.ENV_MAY_DEGRADE: "false"}, False),
    ],
)
def test_may_degrade_follows_names_may_degrade(cert_dir, environment, extra, expected):
    assert config("api", environ(cert_dir, environment, **extra)).may_degrade is expected


# --- the level and the clients --------------------------------------------------------------
@pytest.fixture
def client_files(cert_dir, staging_ca) -> dict[str, str]:
    """The loader's exports for api at MTLS, over real files."""
    publish(cert_dir, staging_ca, "staging", "api")
    return {
        names.ENV_MLFLOW_CLIENT_CERT: str(cert_dir / names.COMBINED_PEM_FILE),
        names.ENV_MLFLOW_SERVER_CERT: str(cert_dir / names.CA_BUNDLE_FILE),
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("MTLS", SecurityLevel.MTLS),
        ("TLS", SecurityLevel.TLS),
        ("INSECURE", SecurityLevel.INSECURE),
        ("tls", SecurityLevel.TLS),
    ],
)
def test_the_level_is_the_one_the_adaptive_client_uses(cert_dir, client_files, value, expected):
    env = environ(cert_dir, **client_files, **{names.ENV_SECURITY_LEVEL: value})
    assert config("api", env).get_security_level() is expected
    assert ClientTLS.from_environ(env).level is expected


@pytest.mark.parametrize(
    ("value", "message"), [(None, "is not set"), ("", "is not set"), ("STRONG", "is not a security level")]
)
def test_no_level_or_an_unknown_one_is_a_client_config_error(cert_dir, value, message, monkeypatch):
    monkeypatch.setenv(names.ENV_SECURITY_LEVEL, "MTLS")  # os.environ is never read
    env = environ(cert_dir)
    if value is not None:
        env[names.ENV_SECURITY_LEVEL] = value
    with pytest.raises(ClientConfigError, match=rf"{names.ENV_SECURITY_LEVEL}.*{message}"):
        config("api", env).get_security_level()


def test_the_async_client_is_built_from_this_environ(cert_dir, client_files, staging_ca, monkeypatch):
    monkeypatch.delenv(names.ENV_SECURITY_LEVEL, raising=False)  # only `environ` can give the level
    env = environ(cert_dir, **client_files, **{names.ENV_SECURITY_LEVEL: "MTLS"})
    base = "https://mlflow.hokusai-staging.local:5000"
    client = config("api", env).create_adaptive_client(base, headers={"X-Test": "1"})
    try:
        assert isinstance(client, httpx.AsyncClient)
        assert (client.base_url.host, client.base_url.port) == ("mlflow.hokusai-staging.local", 5000)
        assert client.headers["X-Test"] == "1"
        context = client._transport.pool._ssl_context  # the adaptive client's ReusingTransport
        trusted = {int(ca["serialNumber"], 16) for ca in context.get_ca_certs()}
        assert trusted == {staging_ca.certificate.serial_number}  # the bundle in cert_dir, no system CAs
    finally:
        asyncio.run(client.aclose())


def test_the_sync_client_is_built_from_this_environ(cert_dir, client_files, monkeypatch):
    monkeypatch.delenv(names.ENV_SECURITY_LEVEL, raising=False)
    env = environ(cert_dir, **client_files, **{names.ENV_SECURITY_LEVEL: "TLS"})
    with config("api", env).create_adaptive_sync_client(
        "https://mlflow.hokusai-staging.local:5000"
    ) as client:
        assert isinstance(client, httpx.Client)


def test_the_clients_keep_the_adaptive_clients_guards(cert_dir, client_files):
    env = environ(cert_dir, **client_files, **{names.ENV_SECURITY_LEVEL: "MTLS"})
    security = config("api", env)
    with pytest.raises(ValueError, match="verify cannot be passed"):
        security.create_adaptive_client(verify=False)
    with pytest.raises(ValueError, match="verify cannot be passed"):
        security.create_adaptive_sync_client(verify=False)
    missing = {**env, names.ENV_MLFLOW_CLIENT_CERT: str(cert_dir / "absent.pem")}
    with pytest.raises(ClientConfigError, match="cannot be read"):
        config("api", missing).create_adaptive_client()


# --- ensure_certificates -------------------------------------------------------------------
@pytest.mark.parametrize("service", ["api", "worker", CONVERTER, "mlflow"])
def test_a_good_set_is_ensured(cert_dir, staging_ca, service):
    publish(cert_dir, staging_ca, "staging", service)
    assert asyncio.run(config(service, environ(cert_dir)).ensure_certificates()) is True


def test_no_files_where_it_may_degrade_is_false_and_loud(cert_dir, caplog):
    security = config("api", environ(cert_dir, "development"))
    with caplog.at_level(logging.WARNING, logger="hokusai_mtls"):
        assert asyncio.run(security.ensure_certificates()) is False
    assert "DEGRADED" in caplog.text and str(cert_dir) in caplog.text and names.CERT_FILE in caplog.text


def test_a_staging_that_may_degrade_returns_false(cert_dir):
    security = config("api", environ(cert_dir, **{names.ENV_MAY_DEGRADE: "true"}))
    assert asyncio.run(security.ensure_certificates()) is False


def test_no_files_in_staging_fails_closed_naming_the_directory(cert_dir):
    with pytest.raises(LoadError, match=rf"no usable certificates in {cert_dir}: .*lacks ca.crt, tls.crt"):
        asyncio.run(config("api", environ(cert_dir)).ensure_certificates())


def test_development_that_may_not_degrade_fails_closed(cert_dir):
    security = config("api", environ(cert_dir, "development", **{names.ENV_MAY_DEGRADE: "false"}))
    with pytest.raises(LoadError, match=str(cert_dir)):
        asyncio.run(security.ensure_certificates())


def test_a_caller_without_its_combined_pem_fails_closed(cert_dir, staging_ca):
    publish(cert_dir, staging_ca, "staging", "api")
    (cert_dir / names.COMBINED_PEM_FILE).unlink()
    with pytest.raises(LoadError, match=rf"lacks {names.COMBINED_PEM_FILE}"):
        asyncio.run(config("api", environ(cert_dir)).ensure_certificates())


def test_another_identitys_certificate_fails_closed(cert_dir, staging_ca):
    publish(cert_dir, staging_ca, "staging", "worker")  # the worker's leaf in the api's directory
    with pytest.raises(LoadError, match=rf"{cert_dir}.*spiffe://hokusai/staging/api"):
        asyncio.run(config("api", environ(cert_dir)).ensure_certificates())


def test_a_set_of_another_environment_fails_closed(cert_dir, development_ca):
    publish(cert_dir, development_ca, "development", "api")
    with pytest.raises(LoadError, match=r"belongs to development, not staging"):
        asyncio.run(config("api", environ(cert_dir)).ensure_certificates())


def test_a_key_of_another_certificate_fails_closed_without_showing_the_key(cert_dir, staging_ca, caplog):
    publish(cert_dir, staging_ca, "staging", "api")
    stranger = staging_ca.issue("staging", names.WORKER).private_key_pem()
    (cert_dir / names.KEY_FILE).unlink()
    (cert_dir / names.KEY_FILE).write_bytes(stranger)
    with pytest.raises(LoadError, match="does not belong to the certificate") as raised:
        asyncio.run(config("api", environ(cert_dir)).ensure_certificates())
    assert "PRIVATE KEY" not in str(raised.value)
    with caplog.at_level(logging.WARNING, logger="hokusai_mtls"):
        assert asyncio.run(config("api", environ(cert_dir, "development")).ensure_certificates()) is False
    assert "does not belong" in caplog.text and "PRIVATE KEY" not in caplog.text


def test_the_rollback_switch_uses_no_certificates_even_in_production(cert_dir, caplog):
    security = config("api", environ(cert_dir, "production", **{names.ENV_ENABLE_MTLS: "false"}))
    with caplog.at_level(logging.WARNING, logger="hokusai_mtls"):
        assert asyncio.run(security.ensure_certificates()) is False
    assert names.ENV_ENABLE_MTLS in caplog.text


def test_the_files_are_read_in_a_thread(cert_dir, staging_ca, monkeypatch):
    publish(cert_dir, staging_ca, "staging", "api")
    used = []
    real = asyncio.to_thread

    async def recording(function, *args):
        used.append(function)
        return await real(function, *args)

    monkeypatch.setattr(security_config.asyncio, "to_thread", recording)
    assert asyncio.run(config("api", environ(cert_dir)).ensure_certificates()) is True
    assert len(used) == 1


# --- the health check -----------------------------------------------------------------------
def test_a_declared_mtls_server_is_checked_on_port_plus_one(cert_dir):
    assert config(CONVERTER, environ(cert_dir)).get_health_check_config() == {
        "service": CONVERTER,
        "serves": "mtls",
        "host": "127.0.0.1",
        "port": 8444,
        "path": "/health",
        "scheme": "http",
        "url": "http://127.0.0.1:8444/health",
        "command": ["CMD", "hokusai-mtls", "health", "--port", "8444"],
        "interval_seconds": 30,
        "timeout_seconds": 5,
        "retries": 3,
        "start_period_seconds": 60,
    }


@pytest.mark.parametrize(
    ("extra", "port"),
    [
        ({names.ENV_HEALTH_PORT: "9100"}, 9100),
        ({names.ENV_PORT: "9443"}, 9444),
        ({names.ENV_PORT: "9443", names.ENV_HEALTH_PORT: "9100"}, 9100),
    ],
)
def test_the_health_port_follows_serve_app(cert_dir, extra, port):
    health = config(CONVERTER, environ(cert_dir, **extra)).get_health_check_config()
    assert health["port"] == port
    assert health["command"] == ["CMD", "hokusai-mtls", "health", "--port", str(port)]


def test_a_bad_health_port_names_the_variable(cert_dir):
    security = config(CONVERTER, environ(cert_dir, **{names.ENV_HEALTH_PORT: "http"}))
    with pytest.raises(ValueError, match=names.ENV_HEALTH_PORT):
        security.get_health_check_config()


@pytest.mark.parametrize(("service", "port"), [("mlflow", names.MLFLOW_HEALTH_PORT), ("api", names.API_PORT)])
def test_our_servers_are_checked_where_the_stacks_check_them(cert_dir, service, port):
    health = config(service, environ(cert_dir)).get_health_check_config()
    assert health["port"] == port and health["scheme"] == "http"
    assert health["command"] == ["CMD", "hokusai-mtls", "health", "--port", str(port)]


def test_a_client_only_service_has_no_health_port(cert_dir):
    assert config("worker", environ(cert_dir)).get_health_check_config() == {
        "service": "worker",
        "serves": None,
    }


def test_the_timings_are_the_task_definitions():
    """The ECS health check the construct writes (parsed, not imported: no CDK in the runtime's tests)."""
    calls = [
        node
        for node in ast.walk(ast.parse(TASK_DEFINITION.read_text(encoding="utf-8")))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "HealthCheck"
    ]
    assert len(calls) == 1
    found = {}
    for keyword in calls[0].keywords:
        value = keyword.value
        if isinstance(value, ast.Call):  # Duration.seconds(N)
            value = value.args[0]
        if isinstance(value, ast.Constant):
            found[keyword.arg] = value.value
    assert found == {
        "interval": security_config.HEALTH_INTERVAL_SECONDS,
        "timeout": security_config.HEALTH_TIMEOUT_SECONDS,
        "retries": security_config.HEALTH_RETRIES,
        "start_period": security_config.HEALTH_START_PERIOD_SECONDS,
    }
