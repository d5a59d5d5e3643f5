"""PEM parsing: malformed, truncated, corrupt and misplaced input each get a clear, named error."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization

from runtime.certificates import pem
from runtime.certificates.identity import TLSIdentity
from runtime.errors import PemError, WrongPemTypeError
from tests.support.certs import client, new_ca


@pytest.fixture
def api():
    return client(new_ca())


def test_bundle_of_several_certificates_loads_in_order():
    first, second = new_ca(), new_ca()
    bundle = pem.bundle_pem([first.certificate, second.certificate])
    assert pem.load_certificates(bundle, "bundle") == [first.certificate, second.certificate]


@pytest.mark.parametrize(("text", "message"), [(b"", "empty"), (b"   \n", "empty"), (b"hello", "not PEM")])
def test_text_without_pem_is_named(text, message):
    with pytest.raises(PemError, match=f"ca.crt: {message}"):
        pem.load_certificates(text, "ca.crt")


def test_truncated_certificate(api):
    cut = api.certificate_pem()[:200]
    with pytest.raises(PemError, match="truncated PEM: -----BEGIN CERTIFICATE----- has no matching END"):
        pem.load_certificate(cut, "api.crt")


def test_truncated_second_certificate_of_a_bundle(api):
    text = api.certificate_pem() + api.certificate_pem()[:-40]
    with pytest.raises(PemError, match="truncated"):
        pem.load_certificates(text, "ca.crt")


def test_corrupt_body(api):
    lines = api.certificate_pem().splitlines(keepends=True)
    lines[3] = b"A" * (len(lines[3]) - 1) + b"\n"
    with pytest.raises(PemError, match=r"api.crt: certificate #1 is corrupt"):
        pem.load_certificate(b"".join(lines), "api.crt")


def test_a_key_where_a_certificate_should_be(api):
    with pytest.raises(WrongPemTypeError, match="expected certificates only, found PRIVATE KEY"):
        pem.load_certificate(api.private_key_pem(), "api.crt")


def test_a_certificate_where_a_key_should_be(api):
    with pytest.raises(WrongPemTypeError, match="expected a private key, found CERTIFICATE"):
        pem.load_private_key(api.certificate_pem(), "api.key")


def test_an_encrypted_key_is_refused_with_the_reason(api):
    encrypted = api.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(PemError, match="encrypted"):
        pem.load_private_key(encrypted, "api.key")


def test_one_certificate_expected_but_two_given(api):
    with pytest.raises(PemError, match="expected one certificate, found 2"):
        pem.load_certificate(api.certificate_pem() * 2, "api.crt")


def test_traditional_ec_key_format_is_accepted(api):
    traditional = api.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert b"BEGIN EC PRIVATE KEY" in traditional
    assert pem.load_private_key(traditional, "api.key").private_numbers() == api.private_key.private_numbers()


def test_identity_secret_round_trip(api):
    again = TLSIdentity.from_secret_string(api.to_secret_string(), "secret")
    assert again.certificate == api.certificate
    assert again.private_key_pem() == api.private_key_pem()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "expected a JSON object"),
        ('{"certificate": "x"}', "private_key missing"),
        ('{"schema": 9, "certificate": "x", "private_key": "y"}', "unsupported schema 9"),
    ],
)
def test_identity_secret_errors_name_the_field(text, message):
    with pytest.raises(PemError, match=message):
        TLSIdentity.from_secret_string(text, "hokusai/development/mlflow/api-identity")


def test_combined_pem_holds_certificate_then_key_for_mlflow(api):
    combined = api.combined_pem()
    assert combined.index(b"BEGIN CERTIFICATE") < combined.index(b"BEGIN PRIVATE KEY")
    assert pem.load_private_key(combined[combined.index(b"-----BEGIN PRIVATE KEY") :], "k")


def test_repr_never_shows_key_material(api):
    text = repr(api)
    assert "CN=api" in text
    assert "PRIVATE" not in text and "0x" not in text
