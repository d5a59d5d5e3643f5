"""Every parser of ours against structure-aware hostile input: a named error or a result, never
anything else (issue 11: an outside fuzz run found tracebacks and errors without a code).

`make test` runs each property with the `suite` profile (Hypothesis's 100 examples, about a
minute for the file); `make fuzz` runs the same properties with the `fuzz` profile
(HOKUSAI_MTLS_FUZZ_EXAMPLES examples each, 20,000 by default).

The property in each: the only exceptions that may leave our code are `MtlsError`s (they carry
the code the CLI prints) and, where the interface says so, `ValueError`; `unexpected-error`, the
CLI's last resort, must never be what a hostile input gets.
"""

from __future__ import annotations

import contextlib
import io
import ssl
import tempfile
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime import cli, json_input, names
from runtime.auth.peer_identity import IdentityPolicy
from runtime.auth.proxy_certificate import ALB_LEAF_HEADER, forwarded_certificate
from runtime.certificates import pem
from runtime.certificates.identity import TLSIdentity
from runtime.certificates.inspection import describe, format_text
from runtime.certificates.verification import verify_certificate
from runtime.errors import MtlsError, RefreshError
from runtime.secrets.loader import LoaderSettings, load_certificates
from runtime.secrets.secret_store import SecretStore
from runtime.serving.asgi_tls import tls_extension
from tests.fuzz.strategies import (
    CA,
    LEAVES,
    hostile_certificates,
    mutated_private_keys,
    pem_texts,
    secret_values,
)
from tests.support import der

pytestmark = [
    pytest.mark.fuzz,
    # cryptography warns (UserWarning, CryptographyDeprecationWarning) about fields it then decodes anyway
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

BUNDLE = [CA.certificate]
BUNDLE_PEM = pem.certificate_pem(CA.certificate).decode()
POLICY = IdentityPolicy.from_environ({names.ENV_ENVIRONMENT: "development"})


def _use(certificate) -> None:
    """Everything our code does with a certificate once it has loaded: none of it may raise but ours."""
    format_text(describe(certificate))
    for kind, hostname, spiffe_id in (
        (names.Kind.SERVER, names.mlflow_hostname("development"), None),
        (names.Kind.CLIENT, None, names.spiffe_id("development", "api")),
    ):
        with contextlib.suppress(MtlsError):
            verify_certificate(certificate, BUNDLE, kind=kind, hostname=hostname, spiffe_id=spiffe_id)
    POLICY._identify(certificate)


@given(hostile_certificates)
def test_a_hostile_certificate_loads_and_is_usable_or_is_refused_with_a_code(certificate_der):
    refused, certificates = _outcome(lambda: pem.load_certificates(der.pem_of(certificate_der), "fuzz.crt"))
    if refused is not None:
        assert refused.code == "malformed-pem"
        assert str(refused).startswith("fuzz.crt: ")
        return
    for certificate in certificates:
        _use(certificate)


def _outcome(action):
    """(the MtlsError `action` raised, None) or (None, its result); anything else propagates."""
    try:
        return None, action()
    except MtlsError as exc:
        return exc, None


class _SSLObject:
    """What asyncio's TLS transport hands our protocol, for a verified peer (OpenSSL's side is done)."""

    def __init__(self, certificate_der: bytes) -> None:
        self._der = certificate_der
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.verify_mode = ssl.CERT_REQUIRED

    def getpeercert(self, binary_form: bool = False):
        return self._der

    def version(self) -> str:
        return "TLSv1.3"


@given(hostile_certificates)
def test_the_tls_layer_and_the_proxy_header_never_raise(certificate_der):
    extension = tls_extension(_SSLObject(certificate_der))
    assert bool(extension["client_cert_chain"]) != bool(extension["client_cert_error"])
    for chain in extension["client_cert_chain"]:
        POLICY.identify_pem(chain)
    header = quote(der.pem_of(certificate_der).decode(), safe="")
    forwarded_certificate([(ALB_LEAF_HEADER, header.encode())], names.PROXY_KIND_ALB, BUNDLE)


@given(pem_texts)
def test_pem_text_of_any_shape_is_read_or_refused_with_a_code(text):
    for load in (pem.load_certificates, pem.load_private_key):
        refused, _ = _outcome(lambda load=load: load(text, "fuzz.pem"))
        assert refused is None or refused.code in ("malformed-pem", "wrong-pem-type", "certificate-error")


@given(mutated_private_keys())
def test_a_mutated_private_key_is_read_or_refused_with_a_code(key_pem):
    try:
        key = pem.load_private_key(key_pem, "fuzz.key")
    except MtlsError:
        return
    with contextlib.suppress(MtlsError):
        TLSIdentity(LEAVES[1].certificate, key)


@given(secret_values)
def test_any_identity_secret_value_is_parsed_or_refused_with_a_code(value):
    try:
        TLSIdentity.from_secret_string(value, "SecretString")
    except MtlsError:
        return


@given(st.one_of(st.text(max_size=64), st.binary(max_size=64), secret_values))
def test_json_from_outside_gives_a_value_or_a_value_error(text):
    with contextlib.suppress(ValueError):
        json_input.loads(text)


class _SecretsManager:
    """Secrets Manager's one call, answering from a dict (a remote service we do not own)."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values

    def get_secret_value(self, SecretId, VersionStage):
        return {"SecretString": self.values[SecretId]}


def _store(identity_value: str) -> SecretStore:
    return SecretStore(
        "development",
        client=_SecretsManager(
            {
                names.secret_name("development", names.CA_BUNDLE_SECRET): BUNDLE_PEM,
                names.secret_name("development", names.API.secret_suffix): identity_value,
            }
        ),
    )


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if not p.name.startswith(".")}


@given(secret_values)
def test_a_refresh_with_any_secret_value_swaps_a_verified_set_or_keeps_the_files(value):
    with tempfile.TemporaryDirectory() as scratch:
        settings = LoaderSettings(
            "development", "api", cert_dir=Path(scratch) / "certs", dev_ca_dir=Path(scratch) / "ca"
        )
        load_certificates(settings, store=_store(LEAVES[1].to_secret_string()))
        before = _snapshot(settings.directory)
        try:
            result = load_certificates(settings, store=_store(value), refresh=True)
        except RefreshError as exc:
            refused = str(exc)
        else:
            refused = None
        if refused is not None:
            assert "[unexpected-error]" not in refused, refused
            assert _snapshot(settings.directory) == before
            return
        assert result.identity is not None and result.summary()
        assert not (Path(scratch) / "ca").exists()  # a refresh never issues from a development CA


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("fuzz-cli")
    (directory / "ca.crt").write_text(BUNDLE_PEM)
    (directory / "api.key").write_bytes(LEAVES[1].private_key_pem())
    return directory


def _cli(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = cli.main(list(argv))
    return status, err.getvalue()


@given(certificate=st.one_of(hostile_certificates.map(der.pem_of), pem_texts.map(str.encode)))
def test_the_cli_answers_any_certificate_file_with_exit_0_or_a_coded_error(scratch, certificate):
    path = scratch / "fuzz.crt"
    path.write_bytes(certificate)
    for argv in (
        ("certs", "inspect", str(path)),
        ("certs", "inspect", "--json", str(path)),
        ("certs", "verify", str(path), "--key", str(scratch / "api.key"), "--ca", str(scratch / "ca.crt")),
    ):
        status, err = _cli(*argv)
        assert status in (0, 1), (argv, err)
        if status == 1:
            assert err.startswith("hokusai-mtls: error ["), err
            assert "[unexpected-error]" not in err, err
