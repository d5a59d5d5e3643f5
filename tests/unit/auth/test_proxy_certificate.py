"""Forwarded client certificates: only the configured proxy kind's own header, only from its address.

A certificate is public. The attacker here holds a copy of the worker's certificate (not its
key) and sends it in every header a proxy might write, from an untrusted address and from an
address inside the trusted-proxy range; only what the configured proxy itself writes counts.
"""

from __future__ import annotations

import hashlib
from urllib.parse import quote

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given
from hypothesis import strategies as st

from runtime import names
from runtime.auth.client_address import AddressPolicy
from runtime.auth.proxy_certificate import check_proxy_kind, parse_xfcc
from runtime.certificates import pem
from runtime.certificates.files import publish_files
from runtime.certificates.published_trust import PublishedTrust, StaticTrust
from runtime.certificates.revocation import Revocations, with_revoked
from tests.support.asgi import INTERNAL, PROXIES, RecordingApp, call, http_scope
from tests.support.certs import forged_list, new_ca

TRUSTED_PROXY = "10.0.100.7"
UNTRUSTED = "10.0.3.4"


def encoded(certificate) -> str:
    return quote(pem.certificate_pem(certificate).decode(), safe="")


@pytest.fixture
def worker(ca):
    return ca.issue_client("development", "worker").certificate


def served_as(middleware, ca, kind, headers, *, peer=TRUSTED_PROXY, trust=None):
    """(status, what the app saw) for a request from `peer` carrying `headers`."""
    app = RecordingApp()
    built = middleware(app=app, proxy_kind=kind, proxy_trust=trust or StaticTrust((ca.certificate,)))
    status, _, _ = call(built, http_scope(peer=peer, headers=headers))
    return status, app.scopes[0] if app.scopes else None


def test_alb_kind_reads_the_verified_leaf_the_alb_writes(middleware, ca, worker, validator):
    status, seen = served_as(
        middleware, ca, names.PROXY_KIND_ALB, [("X-Amzn-Mtls-Clientcert-Leaf", encoded(worker))]
    )
    assert status == 200 and seen["state"]["service_id"] == "worker" and validator.calls == 0
    assert not [k for k, _ in seen["headers"] if k.startswith(b"x-amzn-mtls")]  # stripped for the app


@pytest.mark.parametrize(
    "header",
    [
        "X-Forwarded-Client-Cert",  # an ALB neither writes nor strips it: behind an ALB it is the client's
        "X-Amzn-Mtls-Clientcert",  # the passthrough-mode header: not what a verify-mode ALB writes
    ],
)
def test_alb_kind_ignores_the_headers_an_alb_does_not_write(middleware, ca, worker, header):
    value = f'Cert="{encoded(worker)}"' if header == "X-Forwarded-Client-Cert" else encoded(worker)
    status, seen = served_as(middleware, ca, names.PROXY_KIND_ALB, [(header, value)])
    assert status == 401 and seen is None


def test_envoy_kind_reads_its_single_sanitized_element(middleware, ca, worker):
    xfcc = f'By=spiffe://hokusai/development/api;Hash={hashlib.sha256(worker.public_bytes(Encoding.DER)).hexdigest()};Cert="{encoded(worker)}";URI=spiffe://hokusai/development/worker'
    status, seen = served_as(middleware, ca, names.PROXY_KIND_ENVOY, [("X-Forwarded-Client-Cert", xfcc)])
    assert status == 200 and seen["state"]["service_id"] == "worker"
    assert not [k for k, _ in seen["headers"] if k == b"x-forwarded-client-cert"]


@pytest.mark.parametrize(
    "xfcc",
    [
        # two elements: SANITIZE_SET writes one, so Envoy is not configured as declared
        'By=spiffe://x;Cert="{other}",By=spiffe://y;Cert="{worker}"',
        # a quoted ",Cert=..." inside another field is part of that field, never an element
        'By="spiffe://x,Cert={worker}";Subject="CN=a"',
        'Subject="x\\",Cert={worker}"',
        # a Hash that is not the certificate's
        'Hash=00ff;Cert="{worker}"',
        # malformed: unterminated quote, repeated key, empty element
        'Cert="{worker}',
        'Cert="{worker}";Cert="{worker}"',
        'Cert="{worker}",',
    ],
)
def test_envoy_kind_refuses_anything_but_one_well_formed_element(middleware, ca, worker, xfcc):
    value = xfcc.format(worker=encoded(worker), other=encoded(new_ca().certificate))
    assert served_as(middleware, ca, names.PROXY_KIND_ENVOY, [("X-Forwarded-Client-Cert", value)])[0] == 401


def test_envoy_kind_ignores_the_alb_header(middleware, ca, worker):
    headers = [("X-Amzn-Mtls-Clientcert-Leaf", encoded(worker))]
    assert served_as(middleware, ca, names.PROXY_KIND_ENVOY, headers)[0] == 401


def test_no_kind_reads_nothing_and_still_strips_every_forwarding_header(middleware, ca, worker):
    headers = [
        ("X-Amzn-Mtls-Clientcert-Leaf", encoded(worker)),
        ("X-Amzn-Mtls-Clientcert", encoded(worker)),
        ("X-Forwarded-Client-Cert", f'Cert="{encoded(worker)}"'),
        ("X-API-Key", "good-key"),
    ]
    status, seen = served_as(middleware, ca, names.PROXY_KIND_NONE, headers)
    assert status == 200 and seen["state"]["auth_path"] == "api_key"
    assert [k for k, _ in seen["headers"] if k.startswith((b"x-amzn", b"x-forwarded-client"))] == []


@pytest.mark.parametrize("kind", [names.PROXY_KIND_ALB, names.PROXY_KIND_ENVOY])
def test_a_forwarded_certificate_counts_only_from_a_trusted_proxy_address(middleware, ca, worker, kind):
    header = (
        ("X-Amzn-Mtls-Clientcert-Leaf", encoded(worker))
        if kind == names.PROXY_KIND_ALB
        else ("X-Forwarded-Client-Cert", f'Cert="{encoded(worker)}"')
    )
    assert served_as(middleware, ca, kind, [header])[0] == 200
    assert served_as(middleware, ca, kind, [header], peer=UNTRUSTED)[0] == 401


@pytest.mark.parametrize(
    "value",
    [
        "not a certificate",
        "%ZZ%",
        "",
        "A" * 20_000,  # oversized
    ],
)
def test_garbage_in_the_leaf_header_is_no_certificate(middleware, ca, value):
    assert served_as(middleware, ca, names.PROXY_KIND_ALB, [("X-Amzn-Mtls-Clientcert-Leaf", value)])[0] == 401


def test_the_leaf_header_must_hold_one_client_certificate_of_our_ca_once(middleware, ca, worker):
    leaf = "X-Amzn-Mtls-Clientcert-Leaf"
    foreign = new_ca().issue_client("development", "worker").certificate
    server = ca.issue_server("development").certificate  # ours, but a server certificate
    two = quote(pem.certificate_pem(worker).decode() * 2, safe="")
    for headers in (
        [(leaf, encoded(foreign))],
        [(leaf, encoded(server))],
        [(leaf, two)],
        [(leaf, encoded(worker)), (leaf, encoded(worker))],  # repeated: not one ALB's header
    ):
        assert served_as(middleware, ca, names.PROXY_KIND_ALB, headers)[0] == 401, headers


def test_the_proxy_kind_is_checked_at_start():
    with pytest.raises(ValueError, match="HOKUSAI_MTLS_PROXY_KIND='nginx': expected one of none, alb, envoy"):
        check_proxy_kind("nginx", PROXIES)
    with pytest.raises(
        ValueError, match="HOKUSAI_MTLS_PROXY_KIND=alb needs HOKUSAI_MTLS_TRUSTED_PROXY_CIDRS"
    ):
        check_proxy_kind("alb", ())
    assert check_proxy_kind("none", ()) == "none"
    assert AddressPolicy(INTERNAL, PROXIES).trusted_proxies == PROXIES


def test_xfcc_grammar():
    assert parse_xfcc('By=a;Cert="x,y;z=w";URI=u,Hash=h') == [
        {"by": "a", "cert": "x,y;z=w", "uri": "u"},
        {"hash": "h"},
    ]
    assert parse_xfcc('Subject="CN=\\"q\\",O=x"') == [{"subject": 'CN="q",O=x'}]
    for bad in ("Cert", 'Cert="x', "=x", "a=1;A=2", ",a=1", 'a="x"y'):
        with pytest.raises(ValueError, match="XFCC"):
            parse_xfcc(bad)


@given(st.text(alphabet='abcC=;,"\\ Cert%', max_size=60))
def test_xfcc_parsing_never_fails_any_other_way(value):
    try:
        elements = parse_xfcc(value)
    except ValueError:
        return
    assert elements and all(isinstance(e, dict) and e for e in elements)


# --- the trust follows the loader: revocations, a retired CA ------------------------------------
def test_a_revoked_forwarded_certificate_names_no_one(middleware, ca, worker, validator):
    crl = with_revoked(ca, [worker.serial_number])
    trust = StaticTrust((ca.certificate,), Revocations.verified([crl], [ca.certificate], "ca-crl"))
    headers = [("X-Amzn-Mtls-Clientcert-Leaf", encoded(worker))]
    status, seen = served_as(middleware, ca, names.PROXY_KIND_ALB, headers, trust=trust)
    assert status == 401 and seen is None  # no certificate: the API-key path, and it has no key
    other = ca.issue_client("development", "api").certificate
    headers = [("X-Amzn-Mtls-Clientcert-Leaf", encoded(other))]
    status, seen = served_as(middleware, ca, names.PROXY_KIND_ALB, headers, trust=trust)
    assert status == 200 and seen["state"]["service_id"] == "api"


def publish(directory, bundle, crls=()):
    publish_files(
        directory, {"ca.crt": (pem.bundle_pem(bundle), 0o644), "crl.pem": (pem.crls_pem(list(crls)), 0o644)}
    )


def test_the_published_trust_follows_each_new_version_and_keeps_the_last_good_one(tmp_path, ca, worker):
    publish(tmp_path, [ca.certificate])
    trust = PublishedTrust(tmp_path)
    assert trust.current()[0] == (ca.certificate,) and not trust.current()[1].refuses(worker)
    publish(tmp_path, [ca.certificate], [with_revoked(ca, [worker.serial_number])])
    assert trust.current()[1].refuses(worker)  # the next request sees the refresh
    successor = new_ca("development")
    publish(tmp_path, [successor.certificate])  # a rollover's finish: the old CA is retired
    assert trust.current()[0] == (successor.certificate,)
    publish(tmp_path, [successor.certificate], [forged_list(successor, [1])])  # a list nobody can trust
    assert (
        trust.current()[0] == (successor.certificate,) and len(trust.current()[1]) == 0
    )  # the previous trust stays


def test_a_directory_without_a_bundle_is_refused_at_start(tmp_path):
    from runtime.errors import CertificateError

    with pytest.raises(CertificateError, match="no trust bundle"):
        PublishedTrust(tmp_path)
