"""No credential in any output line of our commands, at DEBUG, with every library logging.

The review found `?api_key=KEY` in the API's log (httpx's INFO line with the upstream URL) and
the key in MLflow's access log (the proxy forwarded it). Here the images' own commands run as
ECS runs them, with HOKUSAI_MTLS_LOG_LEVEL=DEBUG, and everything they print (stdout and stderr)
is searched for the credentials sent: `serve-api` proxying to an mTLS upstream that records what
it receives, and `load-certs` / `run`, whose botocore DEBUG lines carry the Secrets Manager
answers, private keys included.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading

import httpx
import pytest

from local_stack.auth_service import ACTIVE_KEY, UNKNOWN_KEY
from runtime import names
from runtime.certificates.tls_context import ReloadableServerContext, ServerFiles
from runtime.serving.server import Listener, Serving
from tests.integration.conftest import ENV, container_command, server_environment, wait_healthy
from tests.support.servers import answer_lifespan, free_port, running

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BASIC = base64.b64encode(b"someone:Basic-pa55word-7").decode()


class Recorder:
    """The upstream (MLflow's place): answers 200 with what it received, and keeps it."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.lock = threading.Lock()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        while (await receive()).get("more_body"):
            pass
        seen = {
            "raw_path": scope["raw_path"].decode("latin-1"),
            "query_string": scope["query_string"].decode("latin-1"),
            "headers": {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
        }
        with self.lock:
            self.seen.append(seen)
        body = json.dumps(seen).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def recorder(aws, tmp_path_factory):
    files = tmp_path_factory.mktemp("upstream-certs")
    aws["set"].write_to_dir(files)
    app = Recorder()
    port = free_port()
    tls = ReloadableServerContext(ServerFiles(files / "server.crt", files / "server.key", files / "ca.crt"))
    with running(Serving([Listener("mlflow", "127.0.0.1", port, app, tls)])):
        app.url = f"https://127.0.0.1:{port}"
        yield app


@pytest.fixture(scope="module")
def api_at_debug(aws, auth_service, recorder, tmp_path_factory):
    """`hokusai-mtls serve-api` (docker/Dockerfile.api's command) at DEBUG; yields its URL and log."""
    root = tmp_path_factory.mktemp("api-debug")
    port = free_port()
    env = server_environment(
        aws,
        **{
            names.ENV_CERT_DIR: str(root / "certs"),
            names.ENV_AUTH_SERVICE_URL: auth_service.base_url,
            "MLFLOW_TRACKING_URI": recorder.url,
            "HOKUSAI_MTLS_LOG_LEVEL": "DEBUG",
            "PYTHONASYNCIODEBUG": "1",  # asyncio's own DEBUG lines too
        },
    )
    log = root / "api.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [*container_command("Dockerfile.api"), "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    wait_healthy(process, port, log)
    api = {"url": f"http://127.0.0.1:{port}", "log": log, "process": process}
    try:
        yield api
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=20)


def finished_log(api) -> str:
    """Stop the server (its shutdown lines count too) and return everything it printed."""
    if api["process"].poll() is None:
        api["process"].terminate()
        api["process"].wait(timeout=20)
    return api["log"].read_text(errors="replace")


def test_serve_api_at_debug_prints_no_credential_and_forwards_no_query_key(api_at_debug, recorder):
    url = api_at_debug["url"]
    search = "/mlflow/api/2.0/mlflow/experiments/search"
    with httpx.Client(base_url=url, timeout=30) as client:
        sent = [
            client.get(
                f"{search}?max_results=5&api_key={ACTIVE_KEY}",
                headers={"authorization": f"Bearer {ACTIVE_KEY}"},
            ),
            client.get(f"{search}?api_key={ACTIVE_KEY}&max_results=6"),
            client.get(f"{search}?max_results=7&api%5Fkey={ACTIVE_KEY}", headers={"x-api-key": ACTIVE_KEY}),
            client.get(
                f"/mlflow/api/2.0/mlflow-artifacts/artifacts/{ACTIVE_KEY}/m.pkl",
                headers={"x-api-key": ACTIVE_KEY},
            ),
            client.get(f"/mlflow/x/%2F@{ACTIVE_KEY}/y?api_key={ACTIVE_KEY}"),  # refused by the proxy
            client.get(f"{search}?api_key={UNKNOWN_KEY}"),  # refused by the auth service
            client.get(search, headers={"authorization": f"Bearer {UNKNOWN_KEY}"}),
            client.get(
                search, headers={"authorization": f"Basic {BASIC}", "cookie": f"session={ACTIVE_KEY}"}
            ),
        ]
    statuses = [response.status_code for response in sent]
    assert statuses[:4] == [200, 200, 200, 200], [r.text for r in sent]
    assert statuses[4] == 400 and statuses[5] == 401 and statuses[6] == 401, statuses
    queries = [seen["query_string"] for seen in recorder.seen]
    assert "max_results=5" in queries and "max_results=6" in queries and "max_results=7" in queries
    assert not any("api_key" in q or "api%5Fkey" in q or ACTIVE_KEY in q for q in queries), queries

    text = finished_log(api_at_debug)
    for secret in (ACTIVE_KEY, UNKNOWN_KEY, BASIC, "Basic-pa55word-7"):
        assert secret not in text, f"{secret} in the log:\n{text[-4000:]}"
    assert (
        " DEBUG " in text and "mlflow proxy: GET /api/2.0/mlflow/experiments/search" in text
    )  # it was DEBUG
    assert " httpx HTTP Request:" not in text  # httpx logs WARNING and up only: its INFO lines are URLs


@pytest.mark.parametrize("command", ["load-certs", "run"])
def test_the_loader_at_debug_prints_no_private_key(aws, tmp_path, command):
    """botocore logs the Secrets Manager answer at DEBUG: the identity secret holds the key."""
    env = server_environment(aws, HOKUSAI_MTLS_LOG_LEVEL="DEBUG")
    argv = [container_command("Dockerfile.api")[0], command, "--role", "api", "--env", ENV]
    argv += ["--cert-dir", str(tmp_path / "certs")]
    if command == "run":
        argv += ["--", sys.executable, "-c", "print('the command ran')"]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    key_lines = aws["set"].identities["api"].private_key_pem().decode().splitlines()[1:-1]
    assert key_lines and not any(line in output for line in key_lines)
    assert "PRIVATE KEY-----" not in output
    assert "botocore" in result.stderr and " DEBUG " in result.stderr  # the lines were there, redacted
    assert "botocore.auth Signature:\n***\n" in result.stderr  # a SigV4 signature replays for minutes
    if command == "run":
        assert "the command ran" in result.stdout
