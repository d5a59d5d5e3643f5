"""The `hokusai-mtls` command as a user runs it: subprocesses against moto's server."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import boto3
import pytest

from tests.conftest import REGION
from tests.unit.test_service_catalog import PLATFORM

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "runtime.cli"]


def run(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = kw.pop("env", os.environ)
    result = subprocess.run([*CLI, *args], capture_output=True, text=True, check=False, env=env, **kw)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_console_script_is_installed():
    script = shutil.which("hokusai-mtls", path=Path(sys.executable).parent)
    assert script, "pip install -e . (or the wheel) provides the hokusai-mtls command"
    result = subprocess.run([script, "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("hokusai-mtls ")


def test_issue_verify_upload_load_end_to_end(moto_server, tmp_path):
    out = tmp_path / "set"
    issued = run("certs", "issue", "--env", "staging", "--out", str(out), "--server-san", "localhost")
    assert "issued the staging set" in issued.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["ca.crt", "ca.key", "server.crt", "server.key", "api.crt", "api.key", "worker.crt", "worker.key"]
    )
    assert run("certs", "verify", "--dir", str(out), "--env", "staging").stdout.startswith("OK:")

    facts = json.loads(run("certs", "inspect", "--json", str(out / "server.crt")).stdout)
    assert facts[0]["dns_names"] == ["mlflow.hokusai-staging.local", "localhost"]
    assert facts[0]["extended_key_usage"] == ["serverAuth"]
    assert (facts[0]["days_left"], 23.5 < facts[0]["hours_left"] <= 24) == (0, True)  # a day, as issued

    uploaded = run("certs", "upload", "--env", "staging", "--dir", str(out)).stdout.splitlines()
    assert [line.split()[0] for line in uploaded] == ["created"] * 5
    again = run("certs", "upload", "--env", "staging", "--dir", str(out)).stdout.splitlines()
    assert [line.split()[0] for line in again] == ["unchanged"] * 5

    certs = tmp_path / "api-certs"
    script = (
        f'set -e; eval "$({" ".join(CLI)} load-certs --role api --env staging --cert-dir {certs})"; '
        'echo "$MLFLOW_TRACKING_CLIENT_CERT_PATH|$MLFLOW_TRACKING_SERVER_CERT_PATH|$HOKUSAI_MTLS_SECURITY_LEVEL"'
    )
    shell = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True, env=os.environ)
    assert shell.stdout.strip() == f"{certs}/tls.pem|{certs}/ca.crt|MTLS"
    assert "security level MTLS for role api in staging" in shell.stderr
    assert "PRIVATE KEY" not in shell.stderr + shell.stdout


def test_load_certs_in_production_without_secrets_fails_and_prints_nothing_to_eval(moto_server, tmp_path):
    result = run(
        "load-certs",
        "--role",
        "mlflow-server",
        "--env",
        "production",
        "--cert-dir",
        str(tmp_path / "c"),
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert "error [load-failed]" in result.stderr
    assert "hokusai/production/mlflow/server-identity: not found" in result.stderr


def test_load_certs_reads_the_environment_like_a_container(moto_server, tmp_path, monkeypatch):
    monkeypatch.setenv("ENVIRONMENT", "development")
    monkeypatch.setenv("ENABLE_MTLS_AUTH", "false")
    result = run("load-certs", "--role", "worker", "--cert-dir", str(tmp_path / "c"))
    assert "export HOKUSAI_MTLS_SECURITY_LEVEL=INSECURE" in result.stdout
    assert "unset MLFLOW_TRACKING_CLIENT_CERT_PATH" in result.stdout


def test_run_loads_then_becomes_the_command(moto_server, tmp_path):
    certs = tmp_path / "c"
    probe = "import os; print(os.environ['MLFLOW_TRACKING_CLIENT_CERT_PATH'], os.environ['HOKUSAI_MTLS_SECURITY_LEVEL'])"
    result = run(
        "run",
        "--role",
        "worker",
        "--env",
        "development",
        "--cert-dir",
        str(certs),
        "--",
        sys.executable,
        "-c",
        probe,
    )
    assert result.stdout.split() == [str(certs / "tls.pem"), "MTLS"]


def test_run_never_starts_the_command_when_the_load_fails(moto_server, tmp_path):
    marker = tmp_path / "started"
    result = run(
        "run",
        "--role",
        "api",
        "--env",
        "production",
        "--cert-dir",
        str(tmp_path / "c"),
        "--",
        "touch",
        str(marker),
        check=False,
    )
    assert result.returncode == 1
    assert "error [load-failed]" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("run", "--role", "api", "--env", "development"), "needs a command"),
        (("run", "--env", "development", "--", "true"), "--role is needed (or set HOKUSAI_MTLS_ROLE)"),
        (("load-certs", "--role", "api"), "--env is needed (or set ENVIRONMENT)"),
    ],
)
def test_missing_arguments_are_usage_errors(args, message):
    result = run(*args, check=False)
    assert result.returncode == 2
    assert message in result.stderr


def test_issue_from_a_ca_dir_holding_a_rollover_bundle(tmp_path):
    run("certs", "issue", "--env", "staging", "--out", str(tmp_path / "old"))
    run("certs", "issue", "--env", "staging", "--out", str(tmp_path / "new"))
    bundle = (tmp_path / "old" / "ca.crt").read_bytes() + (tmp_path / "new" / "ca.crt").read_bytes()
    (tmp_path / "new" / "ca.crt").write_bytes(bundle)
    run(
        "certs",
        "issue",
        "--env",
        "staging",
        "--out",
        str(tmp_path / "leaves"),
        "--ca-dir",
        str(tmp_path / "new"),
    )
    assert (tmp_path / "leaves" / "ca.crt").read_bytes() == bundle
    run("certs", "verify", "--dir", str(tmp_path / "leaves"), "--env", "staging")


def test_issue_refuses_a_ca_of_another_environment(tmp_path):
    run("certs", "issue", "--env", "staging", "--out", str(tmp_path / "staging"))
    result = run(
        "certs",
        "issue",
        "--env",
        "development",
        "--out",
        str(tmp_path / "dev"),
        "--ca-dir",
        str(tmp_path / "staging"),
        check=False,
    )
    assert result.returncode == 1
    assert "belongs to staging, not development" in result.stderr


def test_upload_refuses_a_set_with_a_leaf_from_another_ca(moto_server, tmp_path):
    run("certs", "issue", "--env", "staging", "--out", str(tmp_path / "a"))
    run("certs", "issue", "--env", "staging", "--out", str(tmp_path / "b"))
    shutil.copy(tmp_path / "b" / "worker.crt", tmp_path / "a" / "worker.crt")
    shutil.copy(tmp_path / "b" / "worker.key", tmp_path / "a" / "worker.key")
    result = run("certs", "upload", "--env", "staging", "--dir", str(tmp_path / "a"), check=False)
    assert result.returncode == 1
    assert "error [untrusted-issuer]" in result.stderr and "worker" in result.stderr
    client = boto3.client("secretsmanager", region_name=REGION, endpoint_url=moto_server)
    assert client.list_secrets()["SecretList"] == []


@pytest.mark.parametrize(
    ("files", "code"),
    [
        (("api.crt", "worker.key", "ca.crt"), "key-mismatch"),
        (("api.key", "api.key", "ca.crt"), "wrong-pem-type"),
        (("api.crt", "api.key", "api.crt"), "not-a-ca"),
    ],
)
def test_verify_names_what_is_wrong(tmp_path, files, code):
    run("certs", "issue", "--env", "development", "--out", str(tmp_path))
    cert, key, ca = (str(tmp_path / f) for f in files)
    result = run("certs", "verify", cert, "--key", key, "--ca", ca, check=False)
    assert result.returncode == 1
    assert f"error [{code}]" in result.stderr


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [("mlflow.hokusai-development.local", "OK:"), ("db.internal", "error [hostname-mismatch]")],
)
def test_verify_server_certificate_with_hostname(tmp_path, hostname, expected):
    run("certs", "issue", "--env", "development", "--out", str(tmp_path))
    cert, key, ca = (str(tmp_path / name) for name in ("server.crt", "server.key", "ca.crt"))
    result = run(
        "certs",
        "verify",
        cert,
        "--key",
        key,
        "--ca",
        ca,
        "--kind",
        "server",
        "--hostname",
        hostname,
        check=False,
    )
    assert expected in result.stdout + result.stderr


def test_issue_never_overwrites_without_force(tmp_path):
    run("certs", "issue", "--env", "development", "--out", str(tmp_path))
    key_before = (tmp_path / "ca.key").read_bytes()
    refused = run("certs", "issue", "--env", "development", "--out", str(tmp_path), check=False)
    assert refused.returncode == 1 and "error [output-exists]" in refused.stderr
    assert (tmp_path / "ca.key").read_bytes() == key_before
    run("certs", "issue", "--env", "development", "--out", str(tmp_path), "--force")
    assert (tmp_path / "ca.key").read_bytes() != key_before


def test_issue_from_an_existing_ca_keeps_the_trust_bundle(tmp_path):
    run("certs", "issue", "--env", "production", "--out", str(tmp_path / "first"))
    run(
        "certs",
        "issue",
        "--env",
        "production",
        "--out",
        str(tmp_path / "renewed"),
        "--ca-dir",
        str(tmp_path / "first"),
    )
    assert (tmp_path / "renewed" / "ca.crt").read_bytes() == (tmp_path / "first" / "ca.crt").read_bytes()
    assert (tmp_path / "renewed" / "api.crt").read_bytes() != (tmp_path / "first" / "api.crt").read_bytes()
    run("certs", "verify", "--dir", str(tmp_path / "renewed"), "--env", "production")


def test_inspect_reports_malformed_input_by_file(tmp_path):
    bad = tmp_path / "cut.crt"
    bad.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n")
    result = run("certs", "inspect", str(bad), check=False)
    assert result.returncode == 1
    assert f"error [malformed-pem]: {bad}: truncated PEM" in result.stderr


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory):
    """Each hostile CA-signed certificate of tests/support/hostile_certificates.py, with its CA."""
    from runtime.certificates import pem
    from tests.support import der
    from tests.support.certs import new_ca
    from tests.support.hostile_certificates import HOSTILE

    directory = tmp_path_factory.mktemp("hostile")
    ca = new_ca()
    (directory / "ca.crt").write_bytes(pem.certificate_pem(ca.certificate))
    (directory / "any.key").write_bytes(ca.identity.private_key_pem())
    files = {}
    for name, make in HOSTILE.items():
        files[name] = directory / (name.replace(" ", "-") + ".crt")
        files[name].write_bytes(der.pem_of(make(ca)))
    return directory, files


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_hostile_certificates_get_a_coded_error_and_no_traceback(hostile_files, command):
    """The outside fuzz run's tracebacks (UnsupportedAlgorithm, DuplicateExtension, InvalidVersion,
    TypeError rendering a subject) and errors without a code, each as the user meets them."""
    from tests.support.hostile_certificates import FIELD

    directory, files = hostile_files
    for name, path in files.items():
        if command == "inspect":
            result = run("certs", "inspect", str(path), check=False)
        else:
            result = run(
                "certs",
                "verify",
                str(path),
                "--key",
                str(directory / "any.key"),
                "--ca",
                str(directory / "ca.crt"),
                check=False,
            )
        assert result.returncode == 1, (name, result.stdout)
        assert "Traceback" not in result.stderr, (name, result.stderr)
        assert result.stderr.startswith(f"hokusai-mtls: error [malformed-pem]: {path}"), (name, result.stderr)
        assert FIELD[name] in result.stderr, (name, result.stderr)


def test_pem_framing_is_linear(tmp_path):
    """1 MB of BEGIN lines without an END took about 4 minutes to refuse (quadratic framing)."""
    hostile = tmp_path / "begins.crt"
    hostile.write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB\n" * (1024 * 1024 // 34))
    result = run("certs", "inspect", str(hostile), check=False, timeout=30)  # not a speed test: a bound
    assert result.returncode == 1 and "truncated PEM" in result.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ("certs", "verify", "--dir", "{missing}", "--env", "staging"),
        ("certs", "upload", "--dir", "{missing}", "--env", "staging"),
        ("certs", "issue", "--env", "staging", "--out", "{out}", "--ca-dir", "{missing}"),
    ],
    ids=["verify --dir", "upload --dir", "issue --ca-dir"],
)
def test_a_missing_directory_is_named_as_a_directory(tmp_path, argv):
    missing = tmp_path / "no-such-set"
    result = run(*(a.format(missing=missing, out=tmp_path / "out") for a in argv), check=False)
    assert result.returncode == 1
    assert f"{missing}: no such directory" in result.stderr and "ca.crt" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_usage_error_prints_the_subcommands_usage():
    result = run("certs", "verify", "some.crt", check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: hokusai-mtls certs verify ")
    assert "give --dir DIR --env ENV, or CERT with --key KEY --ca BUNDLE" in result.stderr


@pytest.mark.parametrize("argv", [(), ("certs",)], ids=["no command", "certs without a command"])
def test_argparse_internal_names_never_show(argv):
    result = run(*argv, check=False)
    assert result.returncode == 2
    assert "certs_command" not in result.stderr and "required: command" not in result.stderr
    assert "required: COMMAND" in result.stderr


def test_usage_errors_exit_2(tmp_path):
    result = run("certs", "issue", "--env", "Prod!", "--out", str(tmp_path / "x"), check=False)
    assert result.returncode == 2
    assert "environment 'Prod!' is not a valid name" in result.stderr
    assert not (tmp_path / "x").exists()


def test_a_declared_service_in_a_declared_environment_is_issued_verified_and_loaded(tmp_path):
    """`--services` (here a cdk.json) gives every command the platform's identities: issue makes the
    streaming service's leaf, verify --dir insists on it, and the loader knows its role."""
    cdk_json = tmp_path / "cdk.json"
    cdk_json.write_text(json.dumps({"context": {"hokusai:services": PLATFORM}}))
    out = tmp_path / "set"
    issued = run("--services", str(cdk_json), "certs", "issue", "--env", "qa", "--out", str(out))
    assert "streaming" in issued.stdout
    assert (out / "streaming.key").stat().st_mode & 0o777 == 0o600
    run("--services", str(cdk_json), "certs", "verify", "--dir", str(out), "--env", "qa")
    (out / "streaming.crt").unlink()
    (out / "streaming.key").unlink()
    refused = run(
        "--services", str(cdk_json), "certs", "verify", "--dir", str(out), "--env", "qa", check=False
    )
    assert refused.returncode == 1 and "lacks identities: streaming" in refused.stderr
    # Without the declaration, the same command checks our three only.
    run("certs", "verify", "--dir", str(out), "--env", "qa")


def test_a_bad_declaration_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "services.json"
    bad.write_text(
        json.dumps({**PLATFORM, "streaming": {"serves": "mtls", "port": 8443, "callers": ["billing"]}})
    )
    result = run(
        "--services", str(bad), "certs", "issue", "--env", "qa", "--out", str(tmp_path / "o"), check=False
    )
    assert result.returncode == 1
    assert result.stderr.strip().endswith(
        "callers: 'billing' is not a declared service (mlflow, api, worker, document-converter, "
        "streaming, batch-report)"
    )
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()
    env = {**os.environ, "HOKUSAI_MTLS_SERVICES": "{"}
    result = run("certs", "issue", "--env", "qa", "--out", str(tmp_path / "o"), check=False, env=env)
    assert result.returncode == 1 and "HOKUSAI_MTLS_SERVICES: not valid JSON" in result.stderr


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        body = b'{"status": "ok"}' if self.path == "/health" else b"no"
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    thread.join()


def test_health_succeeds_on_200_and_prints_the_body(health_server):
    result = run("health", "--port", str(health_server.server_port))
    assert result.stdout.strip() == '{"status": "ok"}'


def test_health_fails_on_an_error_status(health_server, monkeypatch):
    monkeypatch.setattr(_Health, "status", 503)
    result = run("health", "--port", str(health_server.server_port), check=False)
    assert result.returncode == 1
    assert "answered 503" in result.stderr


def test_health_fails_when_nothing_listens():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: connection refused
        result = run("health", "--port", str(port), "--timeout", "1", check=False)
    assert result.returncode == 1
    assert "unreachable" in result.stderr
