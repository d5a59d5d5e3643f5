"""Load one role's certificates into its container: fetch, verify everything, then write.

The order is the guarantee: nothing touches the disk until the trust bundle and the
identity have been fetched and verified together (`runtime.certificates.certset.verify_for`, the same
verification `certs verify --dir` and `certs upload` run), the log line describing them has
been written, and OpenSSL has loaded the new version from its own directory; only then does it
replace the previous files in one atomic swap (`runtime.certificates.files.publish_files`). A failed load
leaves the last good set in place, and whatever fails (a named error, or one nobody foresaw)
becomes a problem in the list, never a traceback.

Reading Secrets Manager has a budget (HOKUSAI_MTLS_SECRETS_BUDGET_SECONDS, default 30 s, every
retry included), so a hung endpoint fails the start well inside ECS's 60 s health-check grace.

A refresh (`refresh=True`: a running service re-loading) that cannot fetch or verify a new set
raises `RefreshError` in every environment and keeps the files it has: the development fallback
below is for start-up only (during an outage it would swap in a certificate from a new CA that
no running client trusts).

Security level (seed 003), logged once:
- `ENABLE_MTLS_AUTH=false` -> INSECURE, the explicit rollback; nothing is fetched.
- everything fetched and valid -> MTLS.
- otherwise staging/production stop with `LoadError`: never a silent downgrade;
  development degrades loudly: to TLS when only the trust bundle is usable by a client,
  else to a locally generated development CA (MTLS), else to INSECURE.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from cryptography import x509

from runtime import env_numbers, names
from runtime.certificates import pem
from runtime.certificates.certset import verify_for
from runtime.certificates.dev_ca import default_dev_ca_dir, load_or_create_dev_ca
from runtime.certificates.files import PRIVATE_FILE_MODE, PUBLIC_FILE_MODE, publish_files
from runtime.certificates.identity import TLSIdentity
from runtime.certificates.inspection import time_left_text
from runtime.certificates.tls_context import check_openssl_accepts
from runtime.errors import LoadError, MtlsError, RefreshError, UnexpectedError
from runtime.security_level import SecurityLevel, parse_flag
from runtime.service_catalog import DEFAULT_CATALOG, Catalog, catalog_from_environ

if TYPE_CHECKING:  # boto3 is imported only when a store is really needed (fast CLI start)
    from runtime.secrets.secret_store import SecretStore

log = logging.getLogger("hokusai_mtls")
T = TypeVar("T")

SOURCE_SECRETS = "secrets-manager"
SOURCE_DEV_CA = "development-ca"
SOURCE_NONE = "none"
DEFAULT_SECRETS_BUDGET_SECONDS = 30.0


@dataclass(frozen=True)
class LoaderSettings:
    """What to load and where; `from_environ` reads the container's variables."""

    environment: str
    role: str
    enable_mtls: bool = True
    cert_dir: Path | None = None
    """Defaults to the role's directory (`/etc/mlflow/certs` or `/tmp/mlflow-certs`)."""
    dev_ca_dir: Path = field(default_factory=default_dev_ca_dir)
    region: str | None = None
    ca_bundle_secret: str | None = None
    """Overrides `hokusai/<env>/mlflow/ca-cert` (HOKUSAI_MTLS_CA_BUNDLE_SECRET, set by the stack)."""
    identity_secret: str | None = None
    """Overrides `hokusai/<env>/mlflow/<identity>-identity` (HOKUSAI_MTLS_IDENTITY_SECRET)."""
    secrets_budget_seconds: float = DEFAULT_SECRETS_BUDGET_SECONDS
    """The most one load spends reading Secrets Manager (HOKUSAI_MTLS_SECRETS_BUDGET_SECONDS)."""
    may_degrade: bool | None = None
    """Whether a start-up may degrade (HOKUSAI_MTLS_MAY_DEGRADE); None: `names.may_degrade`'s default."""
    catalog: Catalog = DEFAULT_CATALOG
    """The declared services (HOKUSAI_MTLS_SERVICES): which roles exist and what each identity is."""
    proxy_kind: str = names.PROXY_KIND_NONE
    """HOKUSAI_MTLS_PROXY_KIND: a proxy forwards client certificates to this task, so it reads the
    revocation lists even if it does not serve mTLS (`Identity.reads_revocations`)."""

    @property
    def reads_revocations(self) -> bool:
        return self.identity.reads_revocations(self.proxy_kind)

    def __post_init__(self) -> None:
        names.check_environment(self.environment)
        self.catalog.identity_for_role(self.role)
        if self.may_degrade is None:
            object.__setattr__(self, "may_degrade", names.may_degrade(self.environment, {}))
        if not 0 < self.secrets_budget_seconds < float("inf"):
            raise ValueError(
                f"{names.ENV_SECRETS_BUDGET_SECONDS}={self.secrets_budget_seconds!r}: expected a positive number of seconds"
            )

    @property
    def identity(self) -> names.Identity:
        return self.catalog.identity_for_role(self.role)

    @property
    def directory(self) -> Path:
        return Path(self.cert_dir or self.identity.default_cert_dir).absolute()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ, **overrides) -> LoaderSettings:
        """Settings from ENVIRONMENT, ENABLE_MTLS_AUTH, HOKUSAI_MTLS_* (overrides win when not None)."""
        # Each field by name (not a dict unpacked into `cls`), so the type checker sees every one.
        enable_mtls = parse_flag(names.ENV_ENABLE_MTLS, environ.get(names.ENV_ENABLE_MTLS), default=True)
        dev_ca_dir = environ.get(names.ENV_DEV_CA_DIR) or default_dev_ca_dir()
        budget = _seconds(environ, names.ENV_SECRETS_BUDGET_SECONDS)
        given = {k: v for k, v in overrides.items() if v is not None}
        environment = _required(
            given.get("environment", environ.get(names.ENV_ENVIRONMENT)), names.ENV_ENVIRONMENT, "--env"
        )
        role = _required(given.get("role", environ.get(names.ENV_ROLE)), names.ENV_ROLE, "--role")
        unexpected = sorted(given.keys() - {item.name for item in fields(cls)})
        if unexpected:  # what `cls(**overrides)` would refuse
            raise TypeError(f"{cls.__name__}.from_environ() got unexpected keyword arguments: {unexpected}")
        cert_dir = given.get("cert_dir", environ.get(names.ENV_CERT_DIR) or None)
        budget = given.get("secrets_budget_seconds", budget)
        may_degrade = given.get("may_degrade", names.may_degrade(environment, environ))
        catalog = given.get("catalog") or catalog_from_environ(environ)
        return cls(
            environment=environment,
            role=role,
            enable_mtls=given.get("enable_mtls", enable_mtls),
            cert_dir=Path(cert_dir) if cert_dir else None,
            dev_ca_dir=Path(given.get("dev_ca_dir", dev_ca_dir)),
            region=given.get("region", environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")),
            ca_bundle_secret=given.get("ca_bundle_secret", environ.get(names.ENV_CA_BUNDLE_SECRET) or None),
            identity_secret=given.get("identity_secret", environ.get(names.ENV_IDENTITY_SECRET) or None),
            secrets_budget_seconds=DEFAULT_SECRETS_BUDGET_SECONDS if budget is None else budget,
            may_degrade=may_degrade,
            catalog=catalog,
            proxy_kind=given.get("proxy_kind", environ.get(names.ENV_PROXY_KIND) or names.PROXY_KIND_NONE),
        )


DEFAULT_REFRESH_SECONDS = 300.0
MAX_REFRESH_SECONDS = 24 * 3600.0
REFRESH_JITTER = 0.2
"""Each wait between refreshes is drawn from [80 %, 100 %] of the interval: tasks started by one deploy
spread their Secrets Manager calls apart, and none waits longer than the interval."""


def refresh_delay(seconds: float, draw: Callable[[], float] = random.random) -> float:
    """The next wait before a refresh: `seconds` less up to `REFRESH_JITTER` of it."""
    return seconds * (1 - REFRESH_JITTER * draw())


def refresh_or_keep(refresh: Callable[[], object]) -> None:
    """Run one refresh of a running process; a failure is logged (its code, never a traceback) and the
    set it has stays: the next interval tries again, and the expiry alarms page long before it runs out."""
    try:
        refresh()
    except MtlsError as exc:
        log.warning("certificate refresh failed [%s]: %s; keeping the set in use", exc.code, exc)
    except Exception as exc:  # never end the refreshing: a later one may succeed
        log.error(
            "certificate refresh failed [%s]: %s: %s; keeping the set in use",
            UnexpectedError.code,
            type(exc).__name__,
            exc,
        )


def refresh_delays(seconds: float) -> Callable[[], float]:
    """Each call: the next jittered wait of a refresh every `seconds` (`periodic(..., delay=)`)."""
    return functools.partial(refresh_delay, seconds)


def check_refresh_interval(seconds: float, certificate: x509.Certificate | None) -> bool:
    """Warn (at start) if a refresh every `seconds` is longer than a quarter of the leaf's life: rotation
    renews before half-life, so a task refreshing more slowly may keep a leaf until it has nearly run out
    (or past it). True if the interval is short enough."""
    if certificate is None:
        return True
    life = (certificate.not_valid_after_utc - certificate.not_valid_before_utc).total_seconds()
    if seconds <= life / 4:
        return True
    log.warning(
        "%s=%g is longer than a quarter of this leaf's life (%.1f hours): a rotated leaf may reach this "
        "task only shortly before the old one expires; refresh at most every %g s",
        names.ENV_REFRESH_SECONDS,
        seconds,
        life / 3600,
        life // 4,
    )
    return False


def refresh_seconds(environ: Mapping[str, str]) -> float:
    """`HOKUSAI_MTLS_REFRESH_SECONDS` (default 300): how often a running service re-loads its set.
    ValueError naming the variable unless more than 0 and at most a day (a refresh must never spin)."""
    return env_numbers.seconds(
        environ, names.ENV_REFRESH_SECONDS, default=DEFAULT_REFRESH_SECONDS, maximum=MAX_REFRESH_SECONDS
    )


def _required(value: str | None, variable: str, option: str) -> str:
    """`value`, unless empty: then a ValueError naming the variable and the option that set it."""
    if not value:
        raise ValueError(f"{variable} is not set (or pass {option})")
    return value


def _seconds(environ: Mapping[str, str], variable: str) -> float | None:
    raw = (environ.get(variable) or "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{variable}={raw!r}: expected a number of seconds") from None


@dataclass(frozen=True)
class LoadResult:
    settings: LoaderSettings
    level: SecurityLevel
    source: str
    files: dict[str, Path]
    identity: TLSIdentity | None = None
    problems: tuple[str, ...] = ()

    def exports(self) -> dict[str, str | None]:
        """Environment for the service: a value to set, or None to unset (so stale paths cannot linger)."""
        f = self.files
        identity = self.settings.identity
        level_is_mtls = self.level is SecurityLevel.MTLS
        ca_bundle = str(f[names.CA_BUNDLE_FILE]) if names.CA_BUNDLE_FILE in f else None
        result: dict[str, str | None] = {
            names.ENV_SECURITY_LEVEL: self.level.value,
            names.ENV_CA_BUNDLE_FILE: ca_bundle,
        }
        if identity.serves:
            result[names.ENV_SERVER_CERT_FILE] = str(f[names.CERT_FILE]) if level_is_mtls else None
            result[names.ENV_SERVER_KEY_FILE] = str(f[names.KEY_FILE]) if level_is_mtls else None
        if identity.calls:
            result[names.ENV_MLFLOW_CLIENT_CERT] = str(f[names.COMBINED_PEM_FILE]) if level_is_mtls else None
            result[names.ENV_MLFLOW_SERVER_CERT] = ca_bundle
            # MLflow raises if this is set alongside SERVER_CERT, and it would disable verification.
            result[names.ENV_MLFLOW_INSECURE_TLS] = None
        return result

    def shell(self) -> str:
        """`export`/`unset` lines for `eval "$(hokusai-mtls load-certs ...)"`."""
        return "\n".join(
            f"export {name}={shlex.quote(value)}" if value is not None else f"unset {name}"
            for name, value in self.exports().items()
        )

    def summary(self) -> str:
        s = self.settings
        text = (
            f"security level {self.level.value} for role {s.role} in {s.environment} (source: {self.source})"
        )
        if self.identity is not None:
            certificate = self.identity.certificate
            text += (
                f"; identity {certificate.subject.rfc4514_string()} serial {certificate.serial_number:x}, "
                f"expires {certificate.not_valid_after_utc:%Y-%m-%d} ({time_left_text(certificate)} left)"
            )
        if self.files:
            text += f"; files in {s.directory}"
        return text


def _default_store(settings: LoaderSettings) -> SecretStore:
    from runtime.secrets.secret_store import SecretStore

    return SecretStore(settings.environment, region=settings.region)


def _attempt(action: Callable[[], T], problems: list[str]) -> T | None:
    """`action()`, or None with the failure added to `problems`: a named error with its code, and
    anything else (hostile input can reach code that raises what no one named) as unexpected."""
    try:
        return action()
    except MtlsError as exc:
        problems.append(f"[{exc.code}] {exc}")
    except Exception as exc:  # the loader ends in a level or `load-failed`, never a traceback
        problems.append(f"[{UnexpectedError.code}] {type(exc).__name__}: {exc}")
    return None


def _files_for(
    identity: names.Identity, bundle, tls: TLSIdentity | None, crls=None
) -> dict[str, tuple[bytes, int]]:
    """The set to publish; with `crls` (a task that reads them) its revocation lists too (`crl.pem`,
    empty if nothing is revoked)."""
    files = {names.CA_BUNDLE_FILE: (pem.bundle_pem(bundle), PUBLIC_FILE_MODE)}
    if tls is not None:
        files[names.CERT_FILE] = (tls.certificate_pem(), PUBLIC_FILE_MODE)
        files[names.KEY_FILE] = (tls.private_key_pem(), PRIVATE_FILE_MODE)
        if identity.calls:
            files[names.COMBINED_PEM_FILE] = (tls.combined_pem(), PRIVATE_FILE_MODE)
        if crls is not None:
            files[names.REVOCATIONS_FILE] = (pem.crls_pem(list(crls)), PUBLIC_FILE_MODE)
    return files


def load_certificates(
    settings: LoaderSettings, *, store: SecretStore | None = None, refresh: bool = False
) -> LoadResult:
    """Fetch, verify and write the role's certificates; log the resulting security level once.

    `refresh=True`: a running service re-loads; anything short of a new verified set raises
    `RefreshError` and leaves the files as they are (the service keeps serving what it has).
    """
    result = _load(settings, store, refresh)
    if result.level is SecurityLevel.MTLS and result.source == SOURCE_SECRETS:
        log.info(result.summary())
    else:
        log.warning(result.summary())
    return result


def read_published(settings: LoaderSettings, level: SecurityLevel, source: str) -> LoadResult:
    """The set another process published in the role's directory, as a `LoadResult`, without
    fetching: for the worker processes of a supervisor (`runtime.serving.workers`), whose loader
    fetched, verified and published it. `LoadError` naming the file if the set is not there."""
    directory = settings.directory
    wanted = [names.CA_BUNDLE_FILE]
    if level is SecurityLevel.MTLS:
        wanted += [names.CERT_FILE, names.KEY_FILE]
        if settings.identity.calls:
            wanted.append(names.COMBINED_PEM_FILE)
    files = {name: directory / name for name in wanted if (directory / name).exists()}
    if level is SecurityLevel.INSECURE:
        return LoadResult(settings, level, source, {})
    if missing := [name for name in wanted if name not in files]:
        raise LoadError(
            f"role {settings.role}: {directory} lacks {', '.join(missing)} (published by the supervisor)"
        )
    tls = None
    if level is SecurityLevel.MTLS:
        certificate = files[names.CERT_FILE]
        try:
            tls = TLSIdentity.from_pem(
                certificate.read_bytes(), files[names.KEY_FILE].read_bytes(), str(certificate)
            )
        except OSError as exc:
            raise LoadError(f"role {settings.role}: cannot read {certificate}: {exc.strerror}") from exc
    return LoadResult(settings, level, source, files, tls)


def _publish(
    settings: LoaderSettings,
    level: SecurityLevel,
    source: str,
    files: dict[str, tuple[bytes, int]],
    tls: TLSIdentity | None = None,
    problems: tuple[str, ...] = (),
) -> LoadResult:
    """Describe the set, have OpenSSL load it, and only then swap it in: nothing fails after the swap."""
    directory = settings.directory
    result = LoadResult(settings, level, source, {name: directory / name for name in files}, tls, problems)
    result.summary()  # a certificate that cannot be described is refused here, not after the swap
    kind = settings.identity.kind

    def openssl_loads(version: Path) -> None:
        if tls is not None:
            check_openssl_accepts(version, kind)

    publish_files(directory, files, check=openssl_loads)
    return result


def _load(settings: LoaderSettings, store: SecretStore | None, refresh: bool) -> LoadResult:
    identity, environment = settings.identity, settings.environment
    if not settings.enable_mtls:
        log.warning(
            "%s=false: mTLS is switched off (rollback); plain HTTP, API-key path only", names.ENV_ENABLE_MTLS
        )
        return LoadResult(settings, SecurityLevel.INSECURE, SOURCE_NONE, {})

    problems: list[str] = []
    deadline = time.monotonic() + settings.secrets_budget_seconds
    store = store or _attempt(lambda: _default_store(settings), problems)
    bundle = tls = None
    if store is not None:
        bundle = _attempt(
            lambda: store.fetch_trust_bundle(settings.ca_bundle_secret, deadline=deadline), problems
        )
        tls = _attempt(
            lambda: store.fetch_identity(identity, settings.identity_secret, deadline=deadline), problems
        )
    # A task that accepts client certificates refuses revoked ones: its set is incomplete without the
    # lists (a refresh that cannot read or verify them keeps the previous set, lists included).
    crls = (
        _attempt(lambda: store.fetch_revocations(bundle, deadline=deadline), problems)
        if store is not None and bundle and settings.reads_revocations
        else []
    )
    # partial, not a lambda: the arguments are bound (and type-checked) here, where `tls` is not None
    if (
        bundle
        and tls
        and crls is not None
        and _attempt(functools.partial(verify_for, identity, tls, bundle, environment), problems)
    ):
        files = _files_for(identity, bundle, tls, crls if settings.reads_revocations else None)
        result = _attempt(
            lambda: _publish(settings, SecurityLevel.MTLS, SOURCE_SECRETS, files, tls), problems
        )
        if result is not None:
            return result

    if refresh:
        raise RefreshError(
            f"role {settings.role} in {environment}: no new set loaded; still using the files in "
            f"{settings.directory}. Problems: " + "; ".join(problems)
        )
    if not settings.may_degrade:
        raise LoadError(
            f"{environment} requires mTLS and the certificates for role {settings.role} did not load; "
            f"the previous files in {settings.directory} are untouched. Problems: " + "; ".join(problems)
        )
    log.warning(
        "DEVELOPMENT FALLBACK for role %s: the certificates in Secrets Manager are unusable (%s)",
        settings.role,
        "; ".join(problems),
    )
    if bundle and identity.kind is names.Kind.CLIENT:  # TLS only: a caller that verifies its server
        files = _files_for(identity, bundle, None)
        return _publish(settings, SecurityLevel.TLS, SOURCE_SECRETS, files, None, tuple(problems))
    try:
        ca = load_or_create_dev_ca(settings.dev_ca_dir, environment, may_degrade=True)
        tls = ca.issue(
            environment,
            identity,
            **({"extra_sans": ("localhost", "127.0.0.1")} if identity.serves else {}),
        )
        files = _files_for(identity, [ca.certificate], tls)
        result = _publish(settings, SecurityLevel.MTLS, SOURCE_DEV_CA, files, tls, tuple(problems))
    except (OSError, MtlsError) as exc:
        problems.append(f"development CA in {settings.dev_ca_dir}: {exc}")
        log.warning("DEVELOPMENT FALLBACK: no certificates at all, running INSECURE (plain HTTP)")
        return LoadResult(settings, SecurityLevel.INSECURE, SOURCE_NONE, {}, None, tuple(problems))
    log.warning(
        "DEVELOPMENT FALLBACK: issued a local certificate from the development-only CA in %s",
        settings.dev_ca_dir,
    )
    return result
