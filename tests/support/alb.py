"""A stand-in for the platform's ALB in front of the API: nginx configured to do what the ALB does.

What the API relies on from an Application Load Balancer listener with mutual TLS in *verify*
mode (docs/DESIGN.md, "Deployment facts"), and how nginx (Debian's `nginx`) is made to do it:

- terminates TLS with its own server certificate (issued here by a CA of its own, unrelated to
  the environment's: the ALB's certificate comes from ACM, not from our CA);
- asks for a client certificate and verifies it against the environment's trust bundle
  (`ssl_verify_client optional`: callers with an API key have none). One difference: a
  certificate that fails verification gets 400 from nginx, where the ALB refuses the handshake;
  either way the request never reaches the API;
- writes the verify-mode headers itself, from the verified certificate only, replacing any
  copy the client sent, and sends none when no certificate was presented:
  `X-Amzn-Mtls-Clientcert-Leaf` (URL-encoded PEM, nginx's `$ssl_client_escaped_cert`),
  `-Serial-Number` (hex), `-Issuer` and `-Subject` (RFC 2253), `-Validity`
  (`NotBefore=YYYY-MM-DDTHH:MM:SSZ;NotAfter=...`, rebuilt from nginx's OpenSSL dates by `map`s);
- appends the socket peer to `X-Forwarded-For`, sets `X-Forwarded-Proto: https` and
  `X-Forwarded-Port` (the listener's port), keeps the client's Host;
- does NOT touch `X-Forwarded-Client-Cert` or `X-Amzn-Mtls-Clientcert` (the passthrough-mode
  header): a real ALB in verify mode neither writes nor strips them, so behind it they are
  whatever the client sent. That is the point of testing against this stand-in.

It runs as one nginx process (`daemon off`, `master_process off`) with its own prefix
directory, listening on its namespace's address; `stop()` ends it. Its own logs, like an ALB's
access logs, record what clients sent; the credential checks apply to our services' logs.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.netns import Namespace

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
ALB_HEADERS = (
    "X-Amzn-Mtls-Clientcert-Leaf",
    "X-Amzn-Mtls-Clientcert-Serial-Number",
    "X-Amzn-Mtls-Clientcert-Issuer",
    "X-Amzn-Mtls-Clientcert-Subject",
    "X-Amzn-Mtls-Clientcert-Validity",
)


def find_nginx() -> str:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and Path(candidate).exists():
            return candidate
    raise RuntimeError("nginx (the ALB stand-in) is missing: apt-get install -y nginx")


@dataclass(frozen=True)
class AlbCertificate:
    """The ALB's server certificate and the CA clients verify it with (`ca_file`)."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def issue_alb_certificate(directory: Path, name: str, address: str) -> AlbCertificate:
    """A CA of the ALB's own and a server certificate for `name` and `address` (like ACM's)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ALB CA (not the environment's)")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name), x509.IPAddress(ipaddress.ip_address(address))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    files = AlbCertificate(directory / "alb-ca.crt", directory / "alb.crt", directory / "alb.key")
    files.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    files.key_file.chmod(0o600)
    return files


def _validity_maps(which: str, source: str) -> str:
    """nginx `map`s turning OpenSSL's `Sep  1 01:50:17 2023 GMT` into `2023-09-01` and `01:50:17`."""
    months = "\n".join(f"        ~^{m} {i:02d};" for i, m in enumerate(MONTHS, 1))
    return f"""
    map {source} $hk_{which}_mon {{
{months}
        default "";
    }}
    map {source} $hk_{which}_day {{
        "~^\\w+ +(?<hk{which}d2>\\d\\d) " $hk{which}d2;
        "~^\\w+ +(?<hk{which}d1>\\d) " 0$hk{which}d1;
        default "";
    }}
    map {source} $hk_{which}_time {{
        "~ (?<hk{which}t>\\d\\d:\\d\\d:\\d\\d) " $hk{which}t;
        default "";
    }}
    map {source} $hk_{which}_year {{
        "~ (?<hk{which}y>\\d\\d\\d\\d) GMT$" $hk{which}y;
        default "";
    }}"""


def nginx_config(
    *, root: Path, listen: str, upstream: str, certificate: AlbCertificate, trust_bundle: Path
) -> str:
    verified = {
        "leaf": "$ssl_client_escaped_cert",
        "serial": "$ssl_client_serial",
        "issuer": "$ssl_client_i_dn",
        "subject": "$ssl_client_s_dn",
        "validity": (
            "NotBefore=$hk_nb_year-$hk_nb_mon-${hk_nb_day}T${hk_nb_time}Z;"
            "NotAfter=$hk_na_year-$hk_na_mon-${hk_na_day}T${hk_na_time}Z"
        ),
    }
    only_if_verified = "\n".join(
        f'    map $ssl_client_verify $hk_{key} {{\n        SUCCESS "{value}";\n        default "";\n    }}'
        for key, value in verified.items()
    )
    temp = root / "tmp"
    return f"""# The ALB stand-in (tests/support/alb.py). Generated; do not edit.
daemon off;
master_process off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log error;
events {{ worker_connections 1024; }}
http {{
    log_format hk '$remote_addr "$request_method $uri" $status verify=$ssl_client_verify';
    access_log {root}/access.log hk;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
{_validity_maps("nb", "$ssl_client_v_start")}
{_validity_maps("na", "$ssl_client_v_end")}
{only_if_verified}
    server {{
        listen {listen} ssl;
        ssl_certificate {certificate.cert_file};
        ssl_certificate_key {certificate.key_file};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_client_certificate {trust_bundle};
        ssl_verify_client optional;
        ssl_verify_depth 2;
        client_max_body_size 100m;
        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header X-Forwarded-Port $server_port;
            proxy_set_header X-Amzn-Mtls-Clientcert-Leaf $hk_leaf;
            proxy_set_header X-Amzn-Mtls-Clientcert-Serial-Number $hk_serial;
            proxy_set_header X-Amzn-Mtls-Clientcert-Issuer $hk_issuer;
            proxy_set_header X-Amzn-Mtls-Clientcert-Subject $hk_subject;
            proxy_set_header X-Amzn-Mtls-Clientcert-Validity $hk_validity;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 60s;
        }}
    }}
}}
"""


class AlbStandIn:
    """nginx in `namespace`, listening on its address at `port`, proxying to `upstream` (host:port)."""

    def __init__(
        self,
        namespace: Namespace,
        root: Path,
        *,
        name: str,
        upstream: str,
        trust_bundle: Path,
        port: int = 443,
    ) -> None:
        self.namespace, self.root, self.name, self.port = namespace, root, name, port
        self.upstream, self.trust_bundle = upstream, trust_bundle
        self.process: subprocess.Popen | None = None
        self.certificate: AlbCertificate | None = None

    @property
    def url(self) -> str:
        """What external clients dial (the ALB's DNS name, in every namespace's hosts file)."""
        return f"https://{self.name}" + ("" if self.port == 443 else f":{self.port}")

    @property
    def error_log(self) -> Path:
        return self.root / "error.log"

    def start(self, timeout: float = 20) -> None:
        nginx = find_nginx()
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.root / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        self.certificate = issue_alb_certificate(self.root / "tls", self.name, self.namespace.address)
        config = self.root / "nginx.conf"
        config.write_text(
            nginx_config(
                root=self.root,
                listen=f"{self.namespace.address}:{self.port}",
                upstream=self.upstream,
                certificate=self.certificate,
                trust_bundle=self.trust_bundle,
            )
        )
        check = self.namespace.run(
            [nginx, "-t", "-q", "-p", str(self.root), "-c", str(config), "-e", str(self.error_log)]
        )
        if check.returncode != 0:
            raise RuntimeError(f"nginx refused its configuration:\n{check.stderr}")
        with (self.root / "nginx.out").open("w") as output:
            self.process = self.namespace.popen(
                [nginx, "-p", str(self.root), "-c", str(config), "-e", str(self.error_log)],
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while not self._listening():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"nginx did not start:\n{self.error_log.read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.05)

    def _listening(self) -> bool:
        """Ready when its port accepts a connection (its pid file proves nothing: `nginx -t` makes one)."""
        try:
            with socket.create_connection((self.namespace.address, self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: finish open requests
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None
