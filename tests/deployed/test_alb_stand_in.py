"""The ALB stand-in writes what an ALB in mutual-TLS verify mode writes, and nothing else.

The API's trust in forwarded headers is only as good as this stand-in's likeness to the ALB,
so it is checked against an echo upstream: a second nginx with the same configuration, in
the `alb` namespace, in front of a server in the `api` namespace that answers with the
headers it received.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509

from tests.support.alb import ALB_HEADERS, AlbStandIn

pytestmark = [pytest.mark.deployed, pytest.mark.slow]
ECHO_PORT, ALB_PORT = 8099, 8443


class Echo(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps([[k, v] for k, v in self.headers.items()]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serve_echo(address: str) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((address, ECHO_PORT), Echo)  # created inside the namespace
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def echo_alb(deployed, tmp_path_factory):
    echo = deployed["api"].call(serve_echo, deployed.address("api"))
    alb = AlbStandIn(
        deployed["alb"],
        tmp_path_factory.mktemp("echo-alb"),
        name=deployed.alb.name,
        upstream=f"{deployed.address('api')}:{ECHO_PORT}",
        trust_bundle=deployed.client_files(None).ca,
        port=ALB_PORT,
    )
    alb.start()
    yield alb
    alb.stop()
    echo.shutdown()
    echo.server_close()


def received(deployed, alb, role: str, *headers: str, files=None) -> dict[str, list[str]]:
    args = ["--cacert", str(alb.certificate.ca_file)]
    for header in headers:
        args += ["-H", header]
    if files is not None:
        args += ["--cert", str(files.cert), "--key", str(files.key)]
    ran = deployed.curl(role, [*args, f"{alb.url}/echo"])
    assert ran.returncode == 0, ran.stderr
    seen: dict[str, list[str]] = {}
    for name, value in json.loads(ran.stdout):
        seen.setdefault(name.lower(), []).append(value)
    return seen


def test_a_verified_certificate_becomes_the_alb_headers(deployed, echo_alb):
    files = deployed.client_files("worker")
    certificate = x509.load_pem_x509_certificate(files.cert.read_bytes())
    seen = received(deployed, echo_alb, "worker", files=files)
    assert urllib.parse.unquote(seen["x-amzn-mtls-clientcert-leaf"][0]).encode() == files.cert.read_bytes()
    assert int(seen["x-amzn-mtls-clientcert-serial-number"][0], 16) == certificate.serial_number
    assert seen["x-amzn-mtls-clientcert-subject"] == [certificate.subject.rfc4514_string()]
    assert seen["x-amzn-mtls-clientcert-issuer"] == [certificate.issuer.rfc4514_string()]
    stamp = "%Y-%m-%dT%H:%M:%SZ"
    assert seen["x-amzn-mtls-clientcert-validity"] == [
        f"NotBefore={certificate.not_valid_before_utc.strftime(stamp)};"
        f"NotAfter={certificate.not_valid_after_utc.strftime(stamp)}"
    ]


def test_client_copies_of_the_alb_headers_are_replaced_or_dropped(deployed, echo_alb):
    forged = [f"{name}: forged" for name in ALB_HEADERS]
    with_certificate = received(deployed, echo_alb, "worker", *forged, files=deployed.client_files("worker"))
    without = received(deployed, echo_alb, "attacker", *forged)
    for name in (h.lower() for h in ALB_HEADERS):
        assert "forged" not in with_certificate[name], name
        assert name not in without, f"{name} sent without a client certificate"


def test_xfcc_and_the_passthrough_header_pass_untouched_as_behind_a_real_alb(deployed, echo_alb):
    seen = received(
        deployed,
        echo_alb,
        "attacker",
        "X-Forwarded-Client-Cert: By=spiffe://x;Cert=forged",
        "X-Amzn-Mtls-Clientcert: forged-chain",
    )
    assert seen["x-forwarded-client-cert"] == ["By=spiffe://x;Cert=forged"]
    assert seen["x-amzn-mtls-clientcert"] == ["forged-chain"]


def test_forwarding_headers_name_the_socket_peer_and_the_listener(deployed, echo_alb):
    seen = received(deployed, echo_alb, "attacker", "X-Forwarded-For: 203.0.113.9")
    assert seen["x-forwarded-for"] == [f"203.0.113.9, {deployed.address('attacker')}"]
    assert seen["x-forwarded-proto"] == ["https"]
    assert seen["x-forwarded-port"] == [str(ALB_PORT)]
    assert re.fullmatch(rf"{re.escape(echo_alb.name)}(:{ALB_PORT})?", seen["host"][0])


def test_a_certificate_of_another_ca_never_reaches_the_upstream(deployed, echo_alb, tmp_path):
    from runtime.certificates.certset import CertificateSet

    foreign = CertificateSet.issue("staging").identities["worker"]
    (tmp_path / "f.crt").write_bytes(foreign.certificate_pem())
    (tmp_path / "f.key").write_bytes(foreign.private_key_pem())
    ran = deployed.curl(
        "attacker",
        [
            "--cacert",
            str(echo_alb.certificate.ca_file),
            "--cert",
            str(tmp_path / "f.crt"),
            "--key",
            str(tmp_path / "f.key"),
            "-w",
            "\n%{http_code}",
            f"{echo_alb.url}/echo",
        ],
    )
    assert ran.stdout.rsplit("\n", 1)[-1] == "400"  # an ALB refuses the handshake instead
