"""What the local stack prints once it is up: where everything runs, and commands to try.

The commands are curl command lines a developer can paste. `up` runs each of them once
before it says "ready" and shows the first line of what it really printed, so the list can
neither rot nor promise what the system does not do (without curl they are shown only).
The external ones use the API key `up` created in our key store (`hokusai-mtls auth
create-key`), and a well-formed key the store does not hold. The certificate paths are the
files the worker's loader wrote (tls.crt, tls.key, ca.crt). The internal commands dial MLflow
by its Cloud Map name, as every client in ECS does; curl's `--resolve` maps the name to
127.0.0.1, which Cloud Map's DNS does in the VPC.

Last comes how to make another key: `hokusai-mtls auth create-key` with the environment in the
run directory's keys.env (0600), so the hashing secret is never printed.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from local_stack.environment import BIN, DEFAULT_RUN_DIR, LOCAL_ENVIRONMENT
from local_stack.started import KEY_DATABASE, KEY_USER, Stack
from runtime import names
from runtime.keys import key_format

CURL_HINT = "curl is not installed (apt-get install -y curl): the commands are shown, not run"
ANOTHER_KEY_NAME = "another key"
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=5"
SHOWN_CHARACTERS = 110
NO_HTTP_ANSWER = (35, 52, 56)
"""curl's exits for a connection closed in the handshake: 35 (TLS 1.2: SSL_connect failed), 52 (TLS 1.3:
"Empty reply from server"), 56 (TLS 1.3: the alert read as a receive failure)."""


def shown_path(path: Path) -> str:
    """Relative to the current directory when inside it (shorter to paste), else absolute."""
    path = path.absolute()  # not resolve(): the loader's files are symlinks into a version directory
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@dataclass
class Example:
    """One command to try, what it shows, and whether it should work or be refused."""

    name: str
    title: str
    argv: list[str]
    succeeds: bool
    """True: MLflow answers (curl exits 0); False: refused (a 401 body, or no HTTP answer at all)."""
    expect_in_output: str | None = None
    expect_exit: tuple[int, ...] = (0,)
    output: str = ""
    exit_code: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def command(self) -> str:
        return shlex.join(self.argv)

    def shown_output(self) -> str:
        """What it printed, on one line (MLflow pretty-prints its JSON), cut to fit."""
        line = " ".join(self.output.split())
        return line if len(line) <= SHOWN_CHARACTERS else line[: SHOWN_CHARACTERS - 3] + "..."


def examples(stack: Stack) -> list[Example]:
    worker = stack.cert_dir(names.WORKER)
    ca, cert, key = (shown_path(worker / f) for f in (names.CA_BUNDLE_FILE, names.CERT_FILE, names.KEY_FILE))
    run_id = stack.worker["run_id"]
    resolve = ["--resolve", f"{stack.mlflow_name}:{stack.ports['mlflow']}:127.0.0.1"]

    unknown = key_format.generate(LOCAL_ENVIRONMENT)  # checksum and all, but in no store

    return [
        Example(
            "external",
            "external: the API key just created through the API (checked against our key store, cached in "
            "Redis), proxied to MLflow over mTLS with the API's certificate",
            ["curl", "-sS", "-H", f"X-API-Key: {stack.api_key['key']}", f"{stack.api_url}/mlflow{SEARCH}"],
            succeeds=True,
            expect_in_output='"experiments"',
        ),
        Example(
            "external-unknown-key",
            "external with a key the store does not hold (well-formed, checksum and all): refused by the "
            "API's middleware (401)",
            ["curl", "-sS", "-H", f"X-API-Key: {unknown}", f"{stack.api_url}/mlflow{SEARCH}"],
            succeeds=False,
            expect_in_output="API key invalid",
        ),
        Example(
            "external-no-key",
            "external without an API key: refused by the API's middleware (401)",
            ["curl", "-sS", f"{stack.api_url}/mlflow{SEARCH}"],
            succeeds=False,
            expect_in_output="API key required",
        ),
        Example(
            "internal",
            "internal: straight to MLflow by its Cloud Map name with the worker's client certificate "
            f"(files its loader wrote), which names {names.spiffe_id(LOCAL_ENVIRONMENT, names.WORKER_SERVICE)}: "
            "no API key",
            [
                "curl",
                "-sS",
                *resolve,
                "--cacert",
                ca,
                "--cert",
                cert,
                "--key",
                key,
                f"{stack.mlflow_name_url}/api/2.0/mlflow/runs/get?run_id={run_id}",
            ],
            succeeds=True,
            expect_in_output=run_id,
        ),
        Example(
            "internal-no-cert",
            "internal without a client certificate: MLflow's TLS layer refuses the handshake and closes the "
            "connection; no HTTP answer at all (curl on TLS 1.3 reports it at its first read)",
            ["curl", "-sS", *resolve, "--cacert", ca, f"{stack.mlflow_name_url}{SEARCH}"],
            succeeds=False,
            expect_exit=NO_HTTP_ANSWER,
        ),
    ]


def run_examples(items: list[Example]) -> bool:
    """Run each command once; record what it printed and any surprise. False without curl."""
    if shutil.which("curl") is None:
        return False
    for example in items:
        result = subprocess.run(example.argv, capture_output=True, text=True, timeout=60)
        example.exit_code = result.returncode
        example.output = result.stdout if result.stdout.strip() else result.stderr
        if result.returncode not in example.expect_exit:
            example.problems.append(f"curl exited {result.returncode}, expected {example.expect_exit}")
        if example.expect_in_output is not None and example.expect_in_output not in example.output:
            example.problems.append(f"expected {example.expect_in_output!r} in its output")
    return True


def another_key_command(stack: Stack) -> str:
    """`hokusai-mtls auth create-key` in a subshell that reads keys.env: the secret stays in the file."""
    create = [
        shown_path(BIN / "hokusai-mtls"),
        "auth",
        "create-key",
        "--user",
        KEY_USER,
        "--name",
        ANOTHER_KEY_NAME,
    ]
    return f"(set -a && . {shlex.quote(shown_path(stack.run.keys_env))} && {shlex.join(create)})"


def print_summary(stack: Stack, items: list[Example], elapsed: float) -> None:
    children, health, worker = stack.children, stack.health, stack.worker
    mlflow, api = health["mlflow"], health["api"]
    rows = [
        ("secrets-manager", stack.secrets_url, "moto's server, Secrets Manager only (plain HTTP, loopback)"),
        ("redis", stack.redis_url, "redis-server: the API-key cache and rate limits (loopback)"),
        *(
            [
                (
                    "postgres",
                    stack.backend_store_shown,
                    f"PostgreSQL: MLflow's backend store, as in ECS, and the API-key store (database {KEY_DATABASE}; loopback)",
                )
            ]
            if stack.postgres is not None
            else []
        ),
        (
            "mlflow",
            stack.mlflow_name_url,
            f"{mlflow['security_level']}, mode {mlflow['mode']}: client certificate required; also "
            f"{stack.mlflow_url}; health {stack.details()['urls']['mlflow-health']}"
            + ("" if stack.postgres is not None else f"; backend store {stack.backend_store_shown}"),
        ),
        (
            "api",
            stack.api_url,
            f"{api['security_level']}: API keys outside (our key store), its own certificate to MLflow",
        ),
        (
            "streaming",
            stack.streaming_url,
            f"{health['streaming']['security_level']}: a WebSocket app behind `hokusai-mtls serve --app`; "
            f"the worker may stream {worker['streaming']['allowed']['path']} only",
        ),
        (
            "worker",
            f"exited {worker['exit_code']}",
            f"{worker['security_level']}: logged run {worker['run_id']} in experiment {worker['experiment']!r}",
        ),
    ]
    print("\nrunning (pids are process groups; `down` and Ctrl-C stop exactly these):")
    for name, where, what in rows:
        print(f"  {name:<16} {where:<46} pid {children[name].pid:<8} {what}")
    print(
        f"  logs {shown_path(stack.run.logs)}/   certificates {shown_path(stack.run.certs)}/   "
        f"state {shown_path(stack.run.state.path)}"
    )
    key = stack.api_key
    print(f"\nAPI keys: checked against our key store, {stack.key_store_shown}")
    print(
        f"  {key['key_prefix']}...  id {key['id']}, user {key['user_id']}, name {key['name']!r}: "
        "created by `hokusai-mtls auth create-key`, used below"
    )
    print("\ntry:")
    ran = bool(items) and items[0].exit_code is not None
    for example in items:
        print(f"  # {example.title}")
        print(f"  {example.command}")
        if ran:
            print(f"    -> {example.shown_output()}")
            for problem in example.problems:
                print(f"    !! not as documented: {problem}")
    if not ran:
        print(f"  ({CURL_HINT})")
    print(
        f"\nanother API key (the store's URL and hashing secret are in {shown_path(stack.run.keys_env)}, 0600; "
        "the secret is never printed):"
    )
    print(f"  {another_key_command(stack)}")
    print(
        "  it prints the new key once, on its first line; list-keys, revoke-key KEY_ID and rotate-key KEY_ID "
        "work the same way (docs/API_KEYS.md)"
    )
    print(
        f"\nlocal stack ready in {elapsed:.1f} s. Stop: Ctrl-C here, or "
        f"`python -m local_stack down{_dir_option(stack)}` from another shell.",
        flush=True,
    )


def _dir_option(stack: Stack) -> str:
    return (
        ""
        if stack.run.root == DEFAULT_RUN_DIR.resolve()
        else f" --dir {shlex.quote(shown_path(stack.run.root))}"
    )
