"""The platform's services as data: a declaration in, identities out, every mistake named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509

from runtime import names
from runtime.certificates.certset import CertificateSet, verify_for
from runtime.certificates.inspection import dns_names, extended_key_usages, uris
from runtime.errors import WrongUsageError
from runtime.secrets.loader import LoaderSettings
from runtime.service_catalog import DEFAULT_CATALOG, catalog_from_environ, catalog_from_file, parse_catalog
from tests.support.certs import new_ca

REPOSITORY = Path(__file__).resolve().parents[2]

PLATFORM = {
    "mlflow": {
        "runtime": "mlflow",
        "serves": "mtls",
        "port": 5000,
        "callers": ["api", "worker", "streaming"],
        "identity": "server",
        "role": "mlflow-server",
    },
    "api": {"runtime": "api", "serves": "proxied", "port": 8000},
    "worker": {},
    "document-converter": {"serves": "mtls", "port": 8443, "callers": ["api"]},
    "streaming": {"serves": "mtls", "port": 8443, "callers": ["api"]},
    "batch-report": {},
}


def test_the_default_declaration_is_our_three_identities_as_deployed():
    assert DEFAULT_CATALOG.identities == names.IDENTITIES
    assert DEFAULT_CATALOG.roles == ("mlflow-server", "api", "worker")
    assert catalog_from_environ({}) is DEFAULT_CATALOG


def test_cdk_json_declares_the_default_services():
    """The CDK app and the runtime read the same declaration: cdk.json's is today's three."""
    assert catalog_from_file(REPOSITORY / "cdk.json") == DEFAULT_CATALOG


def test_a_platform_declaration_makes_each_identity_from_what_the_service_does():
    catalog = parse_catalog(PLATFORM)
    kinds = {identity.name: identity.kind for identity in catalog.identities}
    assert kinds == {
        "server": names.Kind.SERVER,
        "api": names.Kind.CLIENT,
        "worker": names.Kind.CLIENT,
        "document-converter": names.Kind.SERVER,
        "streaming": names.Kind.BOTH,  # it serves, and MLflow lists it as a caller
    }
    assert catalog.identity_of("batch-report") is None  # serves nothing, calls no one: no certificate
    assert catalog.calls("api") == ("mlflow", "document-converter", "streaming")
    assert catalog.identity_for_role("streaming").hostname("qa") == "streaming.hokusai-qa.local"
    assert catalog_from_environ({names.ENV_SERVICES: catalog.to_json()}) == catalog


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"document-converter": {"serves": "mtls", "port": 8443, "callers": ["billing"]}},
            "'billing' is not a declared",
        ),
        ({"worker": {"callers": ["api"]}}, "worker.callers: only an mTLS server"),
        ({"worker": {"port": 9000}}, "worker.port: only a service that serves"),
        ({"document-converter": {"serves": "mtls", "port": 80}}, "document-converter.port: 80 is not a port"),
        ({"document-converter": {"serves": "grpc", "port": 8443}}, "document-converter.serves: 'grpc'"),
        ({"Document_Converter": {}}, "'Document_Converter' is not a service name"),
        ({"worker": {"identity": "api"}}, "two services have the same identity"),
        ({"streaming": {"serves": "mtls", "port": 8443, "callers": ["streaming"]}}, "does not call itself"),
        ({"batch-report": {"runtime": "mlflow"}}, "exactly one service has runtime 'mlflow'"),
    ],
)
def test_every_mistake_names_the_service_and_field(change, message):
    with pytest.raises(ValueError, match=message):
        parse_catalog({**PLATFORM, **change})


def test_a_bad_environment_variable_is_named_and_files_are_named(tmp_path):
    with pytest.raises(ValueError, match=f"{names.ENV_SERVICES}: not valid JSON"):
        catalog_from_environ({names.ENV_SERVICES: "{"})
    with pytest.raises(ValueError, match=f"{names.ENV_SERVICES}.worker.port"):
        catalog_from_environ({names.ENV_SERVICES: json.dumps({**PLATFORM, "worker": {"port": 1}})})
    broken = tmp_path / "cdk.json"
    broken.write_text(json.dumps({"context": {}}))
    with pytest.raises(ValueError, match=f"{broken}: its context has no hokusai:services"):
        catalog_from_file(broken)


def test_the_loader_takes_its_roles_from_the_declaration():
    environ = {names.ENV_SERVICES: parse_catalog(PLATFORM).to_json(), names.ENV_ENVIRONMENT: "qa"}
    settings = LoaderSettings.from_environ(environ, role="document-converter")
    assert settings.identity.kind is names.Kind.SERVER
    assert str(settings.directory) == "/etc/hokusai-mtls/certs"
    assert settings.may_degrade is False  # qa fails closed unless declared otherwise
    with pytest.raises(ValueError, match="unknown role 'billing'; expected one of mlflow-server, api"):
        LoaderSettings.from_environ(environ, role="billing")


def test_may_degrade_is_a_setting_with_developments_default():
    assert names.may_degrade("development", {}) is True
    assert names.may_degrade("qa", {}) is False
    assert names.may_degrade("qa", {names.ENV_MAY_DEGRADE: "true"}) is True
    assert names.may_degrade("development", {names.ENV_MAY_DEGRADE: "false"}) is False
    with pytest.raises(ValueError, match="HOKUSAI_MTLS_MAY_DEGRADE='yes please' is not a boolean"):
        names.may_degrade("qa", {names.ENV_MAY_DEGRADE: "yes please"})


def test_a_service_that_serves_and_calls_gets_one_leaf_with_both_usages():
    catalog = parse_catalog(PLATFORM)
    certificates = CertificateSet.issue("qa", identities=catalog.identities)
    certificates.verify()
    streaming = certificates.identities["streaming"].certificate
    assert set(extended_key_usages(streaming)) == {"serverAuth", "clientAuth"}
    assert dns_names(streaming) == ["streaming.hokusai-qa.local"]
    assert uris(streaming) == ["spiffe://hokusai/qa/streaming"]
    converter = certificates.identities["document-converter"].certificate
    assert extended_key_usages(converter) == ["serverAuth"]
    assert dns_names(converter) == ["document-converter.hokusai-qa.local"]


def test_a_server_only_leaf_is_refused_for_a_service_that_also_calls():
    catalog = parse_catalog(PLATFORM)
    ca = new_ca("qa")
    server_only = ca.issue_server("qa", service="streaming")
    with pytest.raises(WrongUsageError, match="lacks clientAuth"):
        verify_for(catalog.identity_by_name("streaming"), server_only, [ca.certificate], "qa")


def test_a_ca_of_another_declared_environment_is_refused():
    qa = new_ca("qa")
    assert isinstance(qa.certificate, x509.Certificate)
    with pytest.raises(Exception, match="belongs to qa, not staging"):
        CertificateSet.issue("staging", ca=qa)
