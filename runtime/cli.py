"""`hokusai-mtls`: issue, inspect, verify, upload, roll over and load certificates.

Replaces the seed's `generate_mtls_certs.sh` and `load_mlflow_certs.sh`. Results go to
stdout (for `load-certs`: shell lines to `eval`); logs and errors go to stderr. Exit
status: 0 success, 1 a failure, always one line `hokusai-mtls: error [code]: ...` (a named
error's code; `invalid-value` for a setting or argument refused, `os-error`, and
`unexpected-error` for anything unforeseen, never a traceback), 2 a usage error.

Logging (every command, so also `serve-api`, `serve-mlflow`, `run` and `load-certs`): one
stderr handler at `--log-level` / HOKUSAI_MTLS_LOG_LEVEL (INFO; `-q`: WARNING), with
`runtime.observability.log_redaction` installed, so no line of ours or of a library (httpx, httpcore,
uvicorn, mlflow, botocore) carries a credential at any level; httpx and httpcore log WARNING
and up only, because their INFO and DEBUG lines are request URLs. `run` execs COMMAND, which
configures its own logging.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from runtime import __version__, names
from runtime.certificates import pem
from runtime.certificates.certset import CertificateSet, load_ca_dir
from runtime.certificates.identity import TLSIdentity
from runtime.certificates.inspection import describe, format_text, time_left_text
from runtime.certificates.issuance import DEFAULT_CA_LIFETIME_DAYS, SHORT_LEAF_LIFETIME_HOURS, KeyType
from runtime.certificates.verification import verify_identity
from runtime.errors import MtlsError, UnexpectedError
from runtime.observability import log_redaction
from runtime.secrets.loader import (
    LoaderSettings,
    check_refresh_interval,
    load_certificates,
    refresh_delays,
    refresh_seconds,
)
from runtime.secrets.mlflow_config import apply_exports
from runtime.secrets.refreshing_command import run_refreshing
from runtime.service_catalog import catalog_from_environ, catalog_from_file

log = logging.getLogger("hokusai_mtls")

ENV_LOG_LEVEL = names.ENV_LOG_LEVEL
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _directory(path: str, option: str) -> Path:
    """`path` as given for `option`, refused with its name unless it is an existing directory."""
    directory = Path(path)
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "no such directory"
        raise MtlsError(f"{option} {path}: {what}")
    return directory


def environment_name(value: str) -> str:
    """argparse type of `--env`: any valid environment name (environments are declared, not fixed)."""
    try:
        return names.check_environment(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise MtlsError(f"{path}: cannot read ({exc.strerror})") from exc


# --- certs issue ---------------------------------------------------------------------
def _add_leaf_lifetime(
    parser: argparse.ArgumentParser,
    step: str = "",
    default: str = f"{SHORT_LEAF_LIFETIME_HOURS} hours, a year in development",
) -> None:
    lifetime = parser.add_mutually_exclusive_group()
    lifetime.add_argument("--leaf-hours", type=float, help=f"{step}leaf lifetime; default {default}")
    lifetime.add_argument("--leaf-days", type=int, help="the same in days")


def _leaf_hours(args: argparse.Namespace) -> float | None:
    """--leaf-hours, or --leaf-days in hours, or None for the environment's default."""
    if args.leaf_days is not None:
        return args.leaf_days * 24
    return args.leaf_hours


def cmd_issue(args: argparse.Namespace) -> int:
    ca, bundle = load_ca_dir(_directory(args.ca_dir, "--ca-dir")) if args.ca_dir else (None, None)
    identities = catalog_from_environ(os.environ).identities
    certificates = CertificateSet.issue(
        args.env,
        key_type=KeyType(args.key_type),
        leaf_lifetime_hours=_leaf_hours(args),
        ca_lifetime_days=args.ca_days,
        server_sans=tuple(args.server_san),
        ca=ca,
        trust_bundle=bundle,
        identities=identities,
    )
    certificates.verify()
    written = certificates.write_to_dir(Path(args.out), overwrite=args.force)
    print(f"issued the {args.env} set ({args.key_type}) into {args.out}; keys are 0600:")
    width = max(8, *(len(name) for name in certificates.identities))
    print(f"  {'ca':<{width}} {_expiry(certificates.trust_bundle[0])}")
    for name, tls in certificates.identities.items():
        print(f"  {name:<{width}} {_expiry(tls.certificate)}")
    print(f"files: {', '.join(p.name for p in written)}")
    return 0


def _expiry(certificate) -> str:
    facts = describe(certificate)
    return f"{facts['subject']:<52} expires {facts['not_after'][:10]} ({time_left_text(certificate)} left)"


# --- certs inspect -------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    documents = []
    for path in args.files:
        for index, certificate in enumerate(pem.load_certificates(_read(path), path), start=1):
            documents.append({"file": path, "index": index, **describe(certificate)})
    if args.json:
        print(json.dumps(documents, indent=2))
    else:
        print("\n\n".join(format_text(d) for d in documents))
    return 0


# --- certs verify --------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace) -> int:
    if args.dir:
        if not args.env:
            raise UsageError("--dir needs --env (the environment the set was issued for)")
        identities = catalog_from_environ(os.environ).identities
        CertificateSet.read_from_dir(_directory(args.dir, "--dir"), args.env, identities).verify()
        print(f"OK: the {args.env} set in {args.dir} verifies (bundle, every identity, keys, usage, names)")
        return 0
    if not (args.cert and args.key and args.ca):
        raise UsageError("give --dir DIR --env ENV, or CERT with --key KEY --ca BUNDLE")
    tls = TLSIdentity.from_pem(_read(args.cert), _read(args.key), f"{args.cert} with key {args.key}")
    bundle = pem.load_certificates(_read(args.ca), args.ca)
    issuer = verify_identity(
        tls, bundle, kind=names.Kind(args.kind), hostname=args.hostname, spiffe_id=args.spiffe_id
    )
    print(f"OK: {args.cert} is a valid {args.kind} certificate issued by {issuer.subject.rfc4514_string()}")
    return 0


# --- certs upload --------------------------------------------------------------------
def cmd_upload(args: argparse.Namespace) -> int:
    from runtime.secrets.secret_store import SecretStore  # boto3 only for the commands that talk to AWS

    identities = catalog_from_environ(os.environ).identities
    certificates = CertificateSet.read_from_dir(_directory(args.dir, "--dir"), args.env, identities)
    if args.no_ca_key:
        certificates.ca = None
    results = SecretStore(args.env, region=args.region).upload(certificates, kms_key_id=args.kms_key_id)
    for result in results:
        print(f"{result.action:<9} {result.secret_id}")
    return 0


# --- certs rollover ------------------------------------------------------------------
def cmd_rollover(args: argparse.Namespace) -> int:
    from runtime.secrets import rollover  # boto3 only for the commands that talk to AWS

    store = rollover.RolloverStore(args.env, region=args.region)
    if args.step == "status":
        lines = rollover.status(store).lines()
    elif args.step == "begin":
        lines = rollover.begin(store, ca_lifetime_days=args.ca_days)
    elif args.step == "switch":
        lines = rollover.switch(store, leaf_lifetime_hours=_leaf_hours(args))
    else:
        lines = rollover.finish(store)
    print("\n".join(lines))
    if args.step != "status":
        print(f"phase now: {rollover.PHASES[rollover.status(store).phase]}")
    return 0


# --- certs revoke --------------------------------------------------------------------
def cmd_revoke(args: argparse.Namespace) -> int:
    from runtime.secrets import revoke  # boto3 only for the commands that talk to AWS

    catalog = catalog_from_environ(os.environ)
    identity = catalog.identity_by_name(args.identity) if args.identity else None
    serials = [revoke.parse_serial(text) for text in args.serial or ()]
    store = revoke.RevocationStore(args.env, region=args.region, catalog=catalog)
    result = revoke.revoke(store, identity=identity, serials=serials, leaf_lifetime_hours=_leaf_hours(args))
    print("\n".join(result.lines))
    return 0


# --- load-certs ----------------------------------------------------------------------
def _loader_settings(args: argparse.Namespace) -> LoaderSettings:
    for given, variable, option in (
        (args.role, names.ENV_ROLE, "--role"),
        (args.env, names.ENV_ENVIRONMENT, "--env"),
    ):
        if not (given or os.environ.get(variable)):
            raise UsageError(f"{option} is needed (or set {variable})")
    return LoaderSettings.from_environ(
        role=args.role,
        environment=args.env,
        cert_dir=Path(args.cert_dir) if args.cert_dir else None,
        region=args.region,
    )


def cmd_load(args: argparse.Namespace) -> int:
    print(load_certificates(_loader_settings(args)).shell())
    return 0


# --- run ---------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    """Load the certificates, export the variables, run COMMAND and keep its files fresh (the entrypoint).

    Safer than `eval "$(hokusai-mtls load-certs ...)"`, whose failure `set -e` cannot see:
    here a failed load exits 1 and COMMAND never starts. Leaves live a day, so the set is loaded
    again every HOKUSAI_MTLS_REFRESH_SECONDS while COMMAND runs (`runtime.secrets.refreshing_command`).
    """
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UsageError("run needs a command after --, e.g. hokusai-mtls run --role api -- uvicorn app:app")
    interval = refresh_seconds(os.environ)  # a bad value: exit 1 naming the variable, before any work
    settings = _loader_settings(args)
    environ = dict(os.environ)
    loaded = load_certificates(settings)
    check_refresh_interval(interval, loaded.identity.certificate if loaded.identity else None)
    apply_exports(loaded, environ)
    return run_refreshing(
        command,
        environ=environ,
        refresh=lambda: load_certificates(settings, refresh=True),
        next_delay=refresh_delays(interval),
    )


# --- serve-mlflow ----------------------------------------------------------------------
def cmd_serve_mlflow(args: argparse.Namespace) -> int:
    """MLflow's tracking server behind our mTLS listeners (runtime.services.mlflow_server)."""
    from runtime.serving.connection_limits import mlflow_limits

    mlflow_limits(os.environ)  # a bad timeout or bound: exit 1 naming the variable, before any work
    from runtime.services.mlflow_server import serve_mlflow  # imports MLflow: only for this command

    serve_mlflow(host=args.host, port=args.port, health_port=args.health_port, workers=args.workers)
    return 0


def cmd_serve_app(args: argparse.Namespace) -> int:
    """Any ASGI app behind mTLS, WebSockets included (runtime.services.asgi_service)."""
    from runtime.serving.connection_limits import mlflow_limits

    mlflow_limits(os.environ)  # a bad timeout or bound: exit 1 naming the variable, before any work
    from runtime.services.asgi_service import serve_app

    serve_app(args.app, host=args.host, port=args.port, health_port=args.health_port)
    return 0


def cmd_serve_api(args: argparse.Namespace) -> int:
    """The API service's mTLS side: middleware, /mlflow proxy over mTLS, /health (runtime.services.api_service)."""
    from runtime.services.api_service import serve_api

    serve_api(host=args.host, port=args.port, workers=args.workers)
    return 0


# --- health ----------------------------------------------------------------------------
def cmd_health(args: argparse.Namespace) -> int:
    """The container health check: plain HTTP to the task-local health listener on 127.0.0.1.

    Under strict mTLS the service port refuses a caller without a client certificate, and a
    health check has none; so services also answer `/health` on a loopback-only port.
    """
    url = f"http://127.0.0.1:{args.port}{args.path}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            body = response.read(4096).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        raise MtlsError(f"{url} answered {exc.code}: {exc.read(512).decode(errors='replace')}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise MtlsError(f"{url} unreachable: {getattr(exc, 'reason', exc)}") from exc
    print(body)
    return 0


# --- doctor -----------------------------------------------------------------------------
def cmd_doctor(args: argparse.Namespace) -> int:
    """Every step from this identity's secrets to one call of each server it calls (runtime.services.doctor)."""
    from runtime.services import doctor

    connect = {}
    for item in args.connect:
        server, _, address = item.partition("=")
        host, _, port = address.rpartition(":")
        if not (server and host and port.isdigit() and 0 < int(port) < 65536):
            raise UsageError(f"--connect {item!r}: expected SERVER=HOST:PORT, e.g. mlflow=10.0.3.7:5000")
        connect[server] = (host.strip("[]"), int(port))
    settings = _loader_settings(args)
    unknown = sorted(set(connect) - set(settings.catalog.calls(settings.identity.service)))
    if unknown:
        raise UsageError(f"--connect {unknown[0]}: role {settings.role} does not call it")
    return doctor.report(doctor.diagnose(settings, connect=connect, timeout=args.timeout), as_json=args.json)


# --- auth: API keys (seed 002 §5) ---------------------------------------------------------
def cmd_auth(args: argparse.Namespace) -> int:
    """create-key, list-keys, revoke-key, rotate-key, migrate: our key store (runtime.keys.commands)."""
    from runtime.keys import commands  # SQLAlchemy and Alembic: only for these commands
    from runtime.keys.permissions import ADMIN_SCOPE

    environ, url = os.environ, args.url
    if args.auth_command == "migrate":
        done = commands.migrate_store(environ, url)
        _show(args, done, f"key store at revision {done['to']} (was {done['from']})")
    elif args.auth_command == "create-key":
        created = commands.create_key(
            environ,
            user=args.user,
            name=args.name,
            scopes=[*args.scope, *([ADMIN_SCOPE] if args.admin else [])],
            expires_days=args.expires_days,
            rate_limit=args.rate_limit,
            allowed_ips=args.allow_ip or None,
            url=url,
        )
        _show(
            args,
            created,
            f"{created['key']}\n\nkey {created['id']} ({created['key_prefix']}...) for {created['user_id']}: "
            "shown this once; store it now, it cannot be shown again",
        )
    elif args.auth_command == "list-keys":
        keys = commands.list_keys(environ, user=args.user, url=url)
        _show(args, keys, "\n".join(_key_line(key) for key in keys) or "no keys")
    elif args.auth_command == "revoke-key":
        revoked = commands.revoke_key(environ, args.key_id, url=url)
        _show(args, revoked, f"revoked {revoked['id']} ({revoked['key_prefix']}...)")
    elif args.auth_command == "usage":
        summary = commands.key_usage(environ, args.key_id, days=args.days, period=args.period, url=url)
        _show(args, summary, _usage_text(summary))
    else:  # rotate-key
        rotated = commands.rotate_key(environ, args.key_id, grace_hours=args.grace_hours, url=url)
        _show(
            args,
            rotated,
            f"{rotated['key']}\n\nkey {rotated['id']} replaces {rotated['rotated_from']}, which works "
            f"{args.grace_hours:g} more hours: shown this once; store it now",
        )
    return 0


def _usage_text(summary: dict) -> str:
    lines = [
        f"key {summary['key_id']}: {summary['requests']} requests from {summary['since'][:16]} to {summary['until'][:16]}"
    ]
    if times := summary["response_time_ms"]:
        lines.append(
            f"response time ms: p50 {times['p50']}, p95 {times['p95']}, p99 {times['p99']}, max {times['max']}"
        )
    if summary["statuses"]:
        lines.append(
            "status: " + ", ".join(f"{code} x{count}" for code, count in summary["statuses"].items())
        )
    lines.extend(f"  {row['requests']:>8}  {row['endpoint']}" for row in summary["endpoints"])
    return "\n".join(lines)


def _key_line(key: dict) -> str:
    state = "active" if key["is_active"] else "revoked"
    expires = f", expires {key['expires_at'][:16]}" if key["expires_at"] else ""
    return f"{key['id']}  {key['key_prefix']}...  {key['user_id']:<16} {key['name']:<20} {state}{expires}"


def _show(args: argparse.Namespace, document: object, text: str) -> None:
    print(json.dumps(document, indent=2) if args.json else text)


class UsageError(Exception):
    """A wrong combination of arguments argparse cannot express: exit 2 like argparse does."""


def _add_load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--role",
        default=os.environ.get(names.ENV_ROLE),
        help=f"a declared identity's role (ours: {', '.join(names.ROLES)}); default: ${names.ENV_ROLE}",
    )
    parser.add_argument("--env", type=environment_name, help=f"default: ${names.ENV_ENVIRONMENT}")
    parser.add_argument("--cert-dir", help=f"default: ${names.ENV_CERT_DIR}, else the role's directory")
    parser.add_argument("--region", help="default: $AWS_REGION")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hokusai-mtls", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    parser.add_argument(
        "--log-level", type=str.upper, choices=LOG_LEVELS, help=f"default: ${ENV_LOG_LEVEL}, else INFO"
    )
    parser.add_argument(
        "--services",
        metavar="FILE",
        help=f"the declared services: cdk.json (its hokusai:services) or a JSON file of them; default "
        f"${names.ENV_SERVICES}, else mlflow, api and worker",
    )
    # metavar: argparse names a missing subcommand by it, never by `dest` (an internal name)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    load = commands.add_parser("load-certs", help="fetch, verify and write one role's certificates")
    _add_load_options(load)
    load.set_defaults(func=cmd_load, parser=load)

    run = commands.add_parser(
        "run", help="load-certs, then run COMMAND with the variables set, refreshing its files (entrypoint)"
    )
    _add_load_options(run)
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG ...]")
    run.set_defaults(func=cmd_run, parser=run)

    serve = commands.add_parser(
        "serve-mlflow", help="run MLflow behind mTLS (ENVIRONMENT, HOKUSAI_MTLS_MODE, ...)"
    )
    serve.add_argument("--host", help="default 0.0.0.0")
    serve.add_argument("--port", type=int, help=f"default {names.MLFLOW_PORT}")
    serve.add_argument("--health-port", type=int, help=f"127.0.0.1 only; default {names.MLFLOW_HEALTH_PORT}")
    serve.add_argument("--workers", type=int, metavar="N", help=WORKERS_HELP)
    serve.set_defaults(func=cmd_serve_mlflow, parser=serve)

    app = commands.add_parser(
        "serve", help="run any ASGI app behind mTLS, WebSockets included (--app module:attribute)"
    )
    app.add_argument("--app", required=True, metavar="MODULE:ATTRIBUTE", help="the ASGI app to serve")
    app.add_argument("--host", help="default 0.0.0.0")
    app.add_argument("--port", type=int, help=f"default ${names.ENV_PORT}, else 8443")
    app.add_argument(
        "--health-port", type=int, help=f"127.0.0.1 only; default ${names.ENV_HEALTH_PORT}, else the port + 1"
    )
    app.set_defaults(func=cmd_serve_app, parser=app)

    api = commands.add_parser("serve-api", help="run the API service's auth middleware and /mlflow proxy")
    api.add_argument("--host", help="default 0.0.0.0")
    api.add_argument("--port", type=int, help=f"default {names.API_PORT}")
    api.add_argument("--workers", type=int, metavar="N", help=WORKERS_HELP)
    api.set_defaults(func=cmd_serve_api, parser=api)

    health = commands.add_parser("health", help="container health check against the loopback health port")
    health.add_argument("--port", type=int, required=True)
    health.add_argument("--path", default="/health")
    health.add_argument("--timeout", type=float, default=3.0)
    health.set_defaults(func=cmd_health, parser=health)

    doctor = commands.add_parser(
        "doctor", help="check secrets, certificate, DNS, TCP, TLS and one call of each server this role calls"
    )
    _add_load_options(doctor)
    doctor.add_argument(
        "--connect",
        action="append",
        default=[],
        metavar="SERVER=HOST:PORT",
        help="dial this address instead of the server's Cloud Map name (its certificate must still name it)",
    )
    doctor.add_argument("--timeout", type=float, default=5.0, help="seconds per network step")
    doctor.add_argument("--json", action="store_true", help="one JSON document instead of lines")
    doctor.set_defaults(func=cmd_doctor, parser=doctor)

    _add_auth_commands(commands)

    certs = commands.add_parser("certs", help="issue, inspect, verify and upload certificate sets")
    sub = certs.add_subparsers(dest="certs_command", required=True, metavar="COMMAND", title="commands")

    issue = sub.add_parser("issue", help="issue a CA, the MLflow server and every client identity")
    issue.add_argument("--env", required=True, type=environment_name)
    issue.add_argument("--out", required=True, help="directory to write (created 0700)")
    issue.add_argument("--key-type", default=KeyType.ECDSA_P256.value, choices=[k.value for k in KeyType])
    _add_leaf_lifetime(issue)
    issue.add_argument("--ca-days", type=int, default=DEFAULT_CA_LIFETIME_DAYS)
    issue.add_argument(
        "--server-san",
        action="append",
        default=[],
        metavar="NAME_OR_IP",
        help="extra DNS name or IP for the MLflow certificate (repeatable)",
    )
    issue.add_argument("--ca-dir", help="issue from the CA in DIR/ca.crt + DIR/ca.key instead of a new one")
    issue.add_argument("--force", action="store_true", help="overwrite files already in --out")
    issue.set_defaults(func=cmd_issue, parser=issue)

    inspect = sub.add_parser("inspect", help="show subject, SANs, validity, key type and usage")
    inspect.add_argument("files", nargs="+", metavar="PEM")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=cmd_inspect, parser=inspect)

    verify = sub.add_parser("verify", help="verify a whole set (--dir) or one certificate")
    verify.add_argument("cert", nargs="?", metavar="CERT")
    verify.add_argument("--key")
    verify.add_argument("--ca", help="trust bundle (PEM, may hold several CAs)")
    verify.add_argument("--kind", choices=[k.value for k in names.Kind], default=names.Kind.CLIENT.value)
    verify.add_argument("--hostname", help="server certificates: the name clients dial")
    verify.add_argument("--spiffe-id", help="client certificates: the URI SAN expected")
    verify.add_argument("--dir", help="a directory written by `certs issue`")
    verify.add_argument("--env", type=environment_name)
    verify.set_defaults(func=cmd_verify, parser=verify)

    upload = sub.add_parser("upload", help="verify a set and store it in Secrets Manager")
    upload.add_argument("--env", required=True, type=environment_name)
    upload.add_argument("--dir", required=True)
    upload.add_argument("--kms-key-id", help="KMS key for secrets this command creates")
    upload.add_argument("--region", help="default: $AWS_REGION")
    upload.add_argument(
        "--no-ca-key", action="store_true", help="do not upload the CA key even if DIR has it"
    )
    upload.set_defaults(func=cmd_upload, parser=upload)

    rollover = sub.add_parser(
        "rollover",
        help="replace the environment's CA without a refused handshake (status, begin, switch, finish)",
        description="begin: new CA trusted next to the old; switch: new CA issues, identities re-issued; "
        "finish: old CA no longer trusted. Let every service load the secrets between steps.",
    )
    rollover.add_argument("step", choices=["status", "begin", "switch", "finish"])
    rollover.add_argument("--env", required=True, type=environment_name)
    rollover.add_argument("--region", help="default: $AWS_REGION")
    rollover.add_argument(
        "--ca-days", type=int, default=DEFAULT_CA_LIFETIME_DAYS, help="begin: new CA lifetime"
    )
    _add_leaf_lifetime(rollover, "switch: ")
    rollover.set_defaults(func=cmd_rollover, parser=rollover)

    revoke = sub.add_parser(
        "revoke",
        help="refuse an identity's certificates (it gets a fresh leaf first) or given serials on every server",
        description="--identity: a fresh leaf for it, then every certificate of its secret still in date goes "
        "on the issuing CA's revocation list (ca-crl); --serial: those serials only. Every server refuses "
        "them from its next refresh, without a restart.",
    )
    revoke.add_argument("--env", required=True, type=environment_name)
    what = revoke.add_mutually_exclusive_group(required=True)
    what.add_argument("--identity", help="an identity's name (server, api, worker, or a declared one)")
    what.add_argument("--serial", action="append", help="a certificate's serial in hex (repeatable)")
    revoke.add_argument("--region", help="default: $AWS_REGION")
    _add_leaf_lifetime(revoke, "--identity: the fresh ", default="the lifetime of the leaf it replaces")
    revoke.set_defaults(func=cmd_revoke, parser=revoke)
    return parser


def _add_auth_commands(commands) -> None:
    auth = commands.add_parser(
        "auth", help="API keys in our key store: create-key, list-keys, revoke-key, ..."
    )
    verbs = auth.add_subparsers(dest="auth_command", required=True, metavar="COMMAND", title="commands")

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        parser = verbs.add_parser(name, help=help)
        parser.add_argument("--url", help=f"the key store; default ${names.ENV_KEY_STORE_URL}")
        parser.add_argument("--json", action="store_true", help="print JSON")
        parser.set_defaults(func=cmd_auth, parser=parser)
        return parser

    verb("migrate", "create or upgrade the key store's tables")
    create = verb("create-key", "create a key; it is printed this once (--admin: the first admin key)")
    create.add_argument(
        "--user", required=True, help="the owner, as the platform's identity provider names them"
    )
    create.add_argument("--name", required=True, help="what it is for, e.g. ci")
    create.add_argument("--scope", action="append", default=[], help="repeatable, e.g. mlflow:read")
    create.add_argument(
        "--admin", action="store_true", help="add the keys:admin scope: manages every user's keys"
    )
    create.add_argument("--expires-days", type=float, help="default: never")
    create.add_argument("--rate-limit", type=int, help="requests per hour; default: no limit")
    create.add_argument("--allow-ip", action="append", metavar="CIDR", help="repeatable; default: anywhere")
    listing = verb("list-keys", "list keys (never the keys themselves)")
    listing.add_argument("--user", help="only this owner's")
    revoke = verb("revoke-key", "revoke a key now")
    revoke.add_argument("key_id", help="its id (list-keys)")
    rotate = verb("rotate-key", "a new key like this one; the old one works for a grace period")
    rotate.add_argument("key_id", help="its id (list-keys)")
    rotate.add_argument("--grace-hours", type=float, default=24.0, help="default 24; 0 ends the old key now")
    usage = verb("usage", "a key's requests per endpoint, status and period, and its response times")
    usage.add_argument("key_id", help="its id (list-keys)")
    usage.add_argument("--days", type=float, default=7.0, help="the last N days; default 7")
    usage.add_argument("--period", choices=("hour", "day"), default="day", help="default day")


def configure_logging(level: str | None = None, *, quiet: bool = False) -> None:
    """stderr at `level` (else $HOKUSAI_MTLS_LOG_LEVEL, else INFO; `quiet`: WARNING), credentials redacted."""
    wanted = "WARNING" if quiet else (level or os.environ.get(ENV_LOG_LEVEL, "").strip().upper() or "INFO")
    unknown = wanted not in LOG_LEVELS
    logging.basicConfig(
        level=logging.INFO if unknown else getattr(logging, wanted),
        format="%(asctime)s hokusai-mtls %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    log_redaction.install()
    log_redaction.quiet_http_clients()
    if wanted != "DEBUG":  # Alembic's INFO lines (plugins, context, steps): `auth migrate` says it in one
        logging.getLogger("alembic").setLevel(logging.WARNING)
    if unknown:
        log.warning("%s=%r is not one of %s: logging at INFO", ENV_LOG_LEVEL, wanted, ", ".join(LOG_LEVELS))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, quiet=args.quiet)
    try:
        if args.services:  # every command, and what it starts (`run`), then sees the same declaration
            os.environ[names.ENV_SERVICES] = catalog_from_file(Path(args.services)).to_json()
        catalog_from_environ(os.environ)  # a bad HOKUSAI_MTLS_SERVICES: one line naming it, before any work
        return args.func(args)
    except UsageError as exc:
        getattr(args, "parser", parser).print_usage(sys.stderr)  # the subcommand's own usage
        print(f"hokusai-mtls: error: {exc}", file=sys.stderr)
        return 2
    except MtlsError as exc:
        _error(exc.code, exc)
    except ValueError as exc:  # a setting or argument our checks refused with a message
        _error(INVALID_VALUE, exc)
    except OSError as exc:
        _error(OS_ERROR, exc)
    except Exception as exc:  # hostile input reached code that raised what no check named: no traceback
        log.debug("unexpected error", exc_info=True)  # the traceback, for HOKUSAI_MTLS_LOG_LEVEL=DEBUG
        _error(UnexpectedError.code, f"{type(exc).__name__}: {exc}")
    return 1


WORKERS_HELP = f"worker processes on the one port; default ${names.ENV_WORKERS}, else the CPUs the task has"
INVALID_VALUE = "invalid-value"
OS_ERROR = "os-error"


def _error(code: str, message: object) -> None:
    """Every failure prints one line, `hokusai-mtls: error [code]: message`, for people and scripts."""
    print(f"hokusai-mtls: error [{code}]: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
