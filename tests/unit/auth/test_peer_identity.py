"""Who a certificate names: the SPIFFE ID only, read by the SPIFFE rules; the CN only when asked for.

Every certificate here is signed by the environment's own CA: the handshake would accept it,
so the identity decision is all that stands between it and a service's scopes.
"""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from runtime import names
from runtime.auth.peer_identity import IdentityPolicy
from runtime.certificates.spiffe import parse_spiffe_id
from tests.support.certs import crafted_client, new_ca

ENV = "development"


@pytest.fixture(scope="module")
def ca():
    return new_ca(ENV)


def identify(ca, *, cn_fallback=False, **crafted):
    policy = IdentityPolicy(ENV, cn_fallback=cn_fallback)
    found = policy.identify(crafted_client(ca, **crafted).certificate)
    return found.service if found else None


def test_our_spiffe_id_names_the_service(ca):
    assert identify(ca, uris=("spiffe://hokusai/development/api",)) == "api"
    assert identify(ca, uris=("spiffe://hokusai/development/worker",), common_name="api") == "worker"


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://HOKUSAI/development/api",  # trust domains are lower-case
        "SPIFFE://hokusai/development/api",  # the scheme is exactly "spiffe"
        "spiffe://hokusai/Development/api",  # not our environment's name
        "spiffe://hokusai/staging/api",  # another environment
        "spiffe://other/development/api",  # another trust domain
        "spiffe://hokusai/development/api/",  # trailing slash: an empty segment
        "spiffe://hokusai//development/api",
        "spiffe://hokusai/development/./api",
        "spiffe://hokusai/development/x/../api",
        "spiffe://hokusai/development/%61pi",  # percent-encoding is not allowed
        "spiffe://hokusai:443/development/api",  # no port
        "spiffe://user@hokusai/development/api",  # no user info
        "spiffe://hokusai/development/api?x=1",
        "spiffe://hokusai/development/api#x",
        "spiffe://hokusai/development/api/extra",  # our IDs have exactly /<env>/<service>
        "spiffe://hokusai/api",
        "spiffe://hokusai",
    ],
)
def test_a_spiffe_id_that_breaks_the_rules_names_no_one_and_never_falls_back_to_the_cn(ca, uri):
    assert identify(ca, uris=(uri,), common_name="api.hokusai-development.local", cn_fallback=True) is None


def test_an_svid_has_exactly_one_uri_san(ca):
    ours = "spiffe://hokusai/development/api"
    assert identify(ca, uris=(ours, "spiffe://hokusai/development/worker")) is None
    assert identify(ca, uris=(ours, "https://example.com/x")) is None
    assert identify(ca, uris=(ours, ours)) is None


def test_the_cn_alone_names_no_one_by_default(ca):
    assert identify(ca, common_name="api") is None  # the finding: CN=api was served as "api"
    assert identify(ca, common_name="api.hokusai-development.local") is None


def test_the_cn_fallback_is_explicit_and_bound_to_the_environment(ca):
    assert identify(ca, common_name="api.hokusai-development.local", cn_fallback=True) == "api"
    assert identify(ca, common_name="api.hokusai-staging.local", cn_fallback=True) is None
    assert identify(ca, common_name="api", cn_fallback=True) is None  # names no environment
    assert identify(ca, common_name="API.hokusai-development.local", cn_fallback=True) is None
    # a certificate with any URI SAN is judged by it, never by its CN
    assert (
        identify(
            ca,
            uris=("https://example.com/api",),
            common_name="api.hokusai-development.local",
            cn_fallback=True,
        )
        is None
    )


def test_a_repeated_cn_names_no_one(ca):
    cn = x509.NameAttribute(x509.NameOID.COMMON_NAME, "api.hokusai-development.local")
    other = x509.NameAttribute(x509.NameOID.COMMON_NAME, "worker.hokusai-development.local")
    assert identify(ca, subject=x509.Name([cn, other]), cn_fallback=True) is None


def test_the_cn_fallback_setting_is_read_and_checked():
    base = {names.ENV_ENVIRONMENT: ENV}
    assert IdentityPolicy.from_environ(base).cn_fallback is False
    assert IdentityPolicy.from_environ({**base, names.ENV_CN_FALLBACK: "true"}).cn_fallback is True
    with pytest.raises(ValueError, match="HOKUSAI_MTLS_CN_FALLBACK='maybe' is not a boolean"):
        IdentityPolicy.from_environ({**base, names.ENV_CN_FALLBACK: "maybe"})


def test_a_certificate_whose_extensions_cannot_be_parsed_names_no_one(ca):
    """cryptography parses extensions lazily: a malformed SAN raises only when read."""
    good = crafted_client(ca, uris=("spiffe://hokusai/development/api",)).certificate
    der = bytearray(good.public_bytes(Encoding.DER))
    marker = b"spiffe://hokusai/development/api"
    index = der.index(marker)
    der[index - 1] = len(marker) + 40  # the URI's length now runs past its SAN: a malformed SAN
    broken = x509.load_der_x509_certificate(bytes(der))
    assert IdentityPolicy(ENV).identify(broken) is None


@pytest.mark.parametrize(
    ("uri", "segments"),
    [("spiffe://hokusai/a/b", ("a", "b")), ("spiffe://td.example_1-x/a.b/c_d-e", ("a.b", "c_d-e"))],
)
def test_valid_spiffe_ids_parse(uri, segments):
    assert parse_spiffe_id(uri).segments == segments
    assert str(parse_spiffe_id(uri)) == uri


def test_a_declared_server_identifies_only_its_declared_callers():
    """`which identities may call it` from the declaration: the document converter knows the api (with
    `document-converter:call`); the worker, whose certificate the same CA signed, names no one there."""
    from runtime.service_catalog import parse_catalog
    from tests.unit.test_service_catalog import PLATFORM

    qa = new_ca("qa")
    environ = {names.ENV_ENVIRONMENT: "qa", names.ENV_SERVICES: parse_catalog(PLATFORM).to_json()}
    converter = IdentityPolicy.from_environ(environ, server="document-converter")
    api = converter.identify(qa.issue_client("qa", "api").certificate)
    assert api is not None and api.scopes == ("document-converter:call",)
    assert converter.identify(qa.issue_client("qa", "worker").certificate) is None
    mlflow = IdentityPolicy.from_environ(environ, server="mlflow")
    streaming = mlflow.identify(qa.issue_client("qa", "streaming").certificate)
    assert streaming is not None and streaming.scopes == ("mlflow:read", "mlflow:write")
    scoped = IdentityPolicy.from_environ(
        {**environ, names.ENV_SERVICE_SCOPES: '{"worker": ["x"]}'}, server="mlflow"
    )
    assert scoped.identify(qa.issue_client("qa", "api").certificate) is None  # the explicit setting wins
