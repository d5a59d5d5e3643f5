"""`hokusai-mtls doctor --role ROLE`: from inside a task, every step between this identity and its servers,
each with what failed, why and the fix (issue 16; seed 002's `scripts/test_mlflow_connection.py`, grown up).

The steps, in order; a step that cannot run because an earlier one failed is reported as skipped:

1. `secrets`: the CA bundle and this identity's secret can be read (the task role, the KMS key);
2. `certificate`: the chain verifies for this identity in this environment, and how long it has left;
3. per server this identity calls (`hokusai:services`: every server listing its service as a caller):
   `dns` (the Cloud Map name resolves), `tcp` (its port answers: the security groups let us in), `tls`
   (the handshake: the server's certificate is of our CA and names what we dial), `accepted` (the
   server took our certificate and answered HTTP), and for MLflow `mlflow` (one read call is allowed).

Nothing is written but a temporary 0600 copy of our key for the TLS library, removed at once; nothing
secret is printed. Every network step has a timeout.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from runtime import names
from runtime.certificates import pem
from runtime.certificates.certset import verify_for
from runtime.certificates.identity import TLSIdentity
from runtime.certificates.inspection import time_left_text
from runtime.errors import MtlsError
from runtime.secrets.loader import LoaderSettings
from runtime.service_catalog import RUNTIME_MLFLOW, ServiceDeclaration

DEFAULT_TIMEOUT = 5.0
MLFLOW_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"
"""A read every MLflow caller may make (`mlflow:read`): GET, so a route policy's read rules allow it."""
OK, FAIL, SKIPPED = "ok", "fail", "skipped"


@dataclass(frozen=True)
class Step:
    name: str
    status: str
    detail: str
    fix: str = ""


def diagnose(
    settings: LoaderSettings,
    *,
    store=None,
    connect: Mapping[str, tuple[str, int]] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[Step]:
    """Every step for `settings`' identity. `connect`: server -> (host, port) to dial instead of its Cloud
    Map name (the name is still what the server's certificate must carry)."""
    identity, environment = settings.identity, settings.environment
    bundle_secret = settings.ca_bundle_secret or names.secret_name(environment, names.CA_BUNDLE_SECRET)
    identity_secret = settings.identity_secret or names.identity_secret_name(environment, identity)
    # What the loader reads, the doctor reads: the revocation lists too, for a task that checks them.
    lists_secret = (
        names.secret_name(environment, names.CA_REVOCATIONS_SECRET) if settings.reads_revocations else None
    )
    read = " and ".join(s for s in (bundle_secret, identity_secret, lists_secret) if s)
    steps: list[Step] = []
    try:
        store = store or _store(settings)
        deadline = time.monotonic() + settings.secrets_budget_seconds
        bundle = store.fetch_trust_bundle(bundle_secret, deadline=deadline)
        tls = store.fetch_identity(identity, identity_secret, deadline=deadline)
        if lists_secret:
            store.fetch_revocations(bundle, deadline=deadline)  # read and verified, as the loader does
    except Exception as exc:  # any failure is a step's answer, never a traceback
        steps.append(
            Step(
                "secrets",
                FAIL,
                _why(exc),
                f"the task role needs secretsmanager:GetSecretValue on {read} "
                "and kms:Decrypt via Secrets Manager (the Services stack grants "
                "both); a missing secret means the Secrets stack's issuance has not run for this identity",
            )
        )
        return steps
    steps.append(Step("secrets", OK, f"read {read}"))
    try:
        verify_for(identity, tls, bundle, environment)
    except MtlsError as exc:
        steps.append(
            Step(
                "certificate",
                FAIL,
                f"[{exc.code}] {exc}",
                f"rotate it: aws secretsmanager rotate-secret --secret-id {identity_secret}",
            )
        )
        return steps
    steps.append(
        Step(
            "certificate",
            OK,
            f"{identity.name}: serial {tls.certificate.serial_number:x}, {time_left_text(tls.certificate, _now())} left, chain of "
            f"{environment}'s CA",
        )
    )
    catalog = settings.catalog
    for server_name in catalog.calls(identity.service):
        steps += _probe_server(
            catalog.service(server_name), environment, tls, bundle, (connect or {}).get(server_name), timeout
        )
    return steps


def _probe_server(
    server: ServiceDeclaration,
    environment: str,
    tls: TLSIdentity,
    bundle: list,
    address: tuple[str, int] | None,
    timeout: float,
) -> list[Step]:
    hostname = f"{server.name}.hokusai-{environment}.local"
    host, port = address or (hostname, int(server.port or 0))
    label = server.name
    steps: list[Step] = []
    try:
        resolved = str(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0])
    except OSError as exc:
        return [
            Step(
                f"{label}: dns",
                FAIL,
                f"{host} does not resolve ({exc})",
                "the Cloud Map name resolves only inside the VPC: run doctor in a task; check that "
                f"{server.name}'s ECS service has running tasks (it registers them)",
            ),
            *_skipped(label, "tcp", "tls", "accepted"),
        ]
    steps.append(Step(f"{label}: dns", OK, f"{host} -> {resolved}"))
    try:
        raw = socket.create_connection((resolved, port), timeout=timeout)
    except OSError as exc:
        return [
            *steps,
            Step(
                f"{label}: tcp",
                FAIL,
                f"{resolved}:{port}: {exc}",
                f"only the declared callers of {server.name} reach port {port} (security groups): is this "
                f"service in hokusai:services.{server.name}.callers? Is {server.name} listening?",
            ),
            *_skipped(label, "tls", "accepted"),
        ]
    steps.append(Step(f"{label}: tcp", OK, f"{resolved}:{port} answers"))
    with raw, tempfile.TemporaryDirectory(prefix="hokusai-doctor-") as scratch:
        context = _client_context(tls, bundle, Path(scratch))
        try:
            connection = context.wrap_socket(raw, server_hostname=hostname)
        except ssl.SSLCertVerificationError as exc:
            return [
                *steps,
                Step(
                    f"{label}: tls",
                    FAIL,
                    f"the server's certificate: {exc.verify_message}",
                    f"the server must present a leaf of {environment}'s CA naming {hostname}: check its "
                    "loader (hokusai-mtls load-certs) and the bundle it serves",
                ),
                *_skipped(label, "accepted"),
            ]
        except (ssl.SSLError, OSError) as exc:
            return [
                *steps,
                Step(f"{label}: tls", FAIL, _why(exc), "is this port the server's TLS port?"),
                *_skipped(label, "accepted"),
            ]
        with connection:
            steps.append(
                Step(f"{label}: tls", OK, f"{connection.version()}, server certificate names {hostname}")
            )
            path = MLFLOW_PROBE if server.runtime == RUNTIME_MLFLOW else "/"
            try:
                status = _request(connection, hostname, path)
            except (ssl.SSLError, OSError) as exc:
                return [
                    *steps,
                    Step(
                        f"{label}: accepted",
                        FAIL,
                        f"the server refused our certificate: {_why(exc)}",
                        f"its logs name the reason (mTLS handshake from ... refused: ...); `revoked`: this "
                        f"serial ({tls.certificate.serial_number:x}) was revoked and the task loads its fresh "
                        f"leaf at the next refresh; else is {tls.certificate.subject.rfc4514_string()} "
                        f"of the identity {server.name} expects?",
                    ),
                ]
    steps.append(Step(f"{label}: accepted", OK, f"GET {path}: HTTP {status}"))
    if server.runtime == RUNTIME_MLFLOW:
        if status == 200:
            steps.append(Step(f"{label}: mlflow", OK, "experiments/search answered 200"))
        else:
            steps.append(
                Step(
                    f"{label}: mlflow",
                    FAIL,
                    f"experiments/search answered {status}",
                    "403: the identity lacks mlflow:read (serviceScopes) or a route policy refuses it; "
                    "5xx: MLflow's backend store (its logs)",
                )
            )
    return steps


def _request(connection: ssl.SSLSocket, hostname: str, path: str) -> int:
    connection.sendall(f"GET {path} HTTP/1.1\r\nHost: {hostname}\r\nConnection: close\r\n\r\n".encode())
    head = b""
    while b"\r\n" not in head and len(head) < 1024:
        chunk = connection.recv(1024)
        if not chunk:
            break
        head += chunk
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise OSError(f"no HTTP answer ({head[:60]!r})")
    return int(parts[1])


def _client_context(tls: TLSIdentity, bundle: list, scratch: Path) -> ssl.SSLContext:
    """Verifies the server (our CA, the name we dial) and presents our certificate; the key is in a
    0600 file under a private temporary directory only while the context loads it."""
    context = ssl.create_default_context(cadata=pem.bundle_pem(bundle).decode())
    combined = scratch / "tls.pem"
    combined.touch(mode=0o600)
    combined.write_bytes(tls.combined_pem())
    context.load_cert_chain(str(combined))
    combined.unlink()
    return context


def _skipped(label: str, *names_: str) -> list[Step]:
    return [Step(f"{label}: {name}", SKIPPED, "an earlier step failed") for name in names_]


def _why(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    return f"[{code}] {exc}" if isinstance(exc, MtlsError) else f"{type(exc).__name__}: {exc}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _store(settings: LoaderSettings):
    from runtime.secrets.secret_store import SecretStore

    return SecretStore(settings.environment, region=settings.region)


def report(steps: list[Step], *, as_json: bool, write: Callable[[str], None] = print) -> int:
    """Print the steps (a line each, the fix under a failure; or one JSON document); 1 if any failed."""
    failed = any(step.status == FAIL for step in steps)
    if as_json:
        write(json.dumps({"ok": not failed, "steps": [asdict(step) for step in steps]}, indent=2))
    else:
        for step in steps:
            write(f"{step.status.upper():7} {step.name}: {step.detail}")
            if step.fix and step.status == FAIL:
                write(f"        fix: {step.fix}")
    return 1 if failed else 0
