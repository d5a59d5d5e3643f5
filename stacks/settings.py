"""Per-environment settings, read from cdk.json's context key `hokusai:environments`.

Pure Python (no aws-cdk-lib import) so it is cheap to test. Every problem is reported
as a `SettingsError` that names the environment and the setting, e.g.
`hokusai:environments.production.removalPolicy: ...`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runtime import names

CONTEXT_KEY = "hokusai:environments"

REMOVAL_POLICIES = ("retain", "destroy")
RETAINED_ENVIRONMENTS = frozenset({"production"})
"""Environments whose data must survive a stack deletion: `removalPolicy` must be `retain`."""

LOG_RETENTION_DAYS = (
    1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653,
)  # fmt: skip
"""The values CloudWatch Logs accepts for a log group's retention."""

MAX_LEAF_LIFETIME_DAYS = 397

_ACCOUNT = re.compile(r"^\d{12}$")
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")

# cdk.json key -> dataclass field
_KEYS = {
    "leafLifetimeDays": "leaf_lifetime_days",
    "logRetentionDays": "log_retention_days",
    "removalPolicy": "removal_policy",
    "account": "account",
    "region": "region",
}
_REQUIRED = ("leafLifetimeDays", "logRetentionDays", "removalPolicy")


class SettingsError(ValueError):
    """A setting in cdk.json is missing, unknown or out of range."""


@dataclass(frozen=True, kw_only=True)
class EnvironmentSettings:
    """What differs between development, staging and production."""

    environment: str
    leaf_lifetime_days: int
    """How long the leaf (service) certificates issued for this environment stay valid."""
    log_retention_days: int
    removal_policy: str
    """`retain` or `destroy`: what happens to keys and secrets when the stack goes away."""
    account: str | None = None
    region: str | None = None
    """Both None: the stage is environment-agnostic (the deploying credentials decide)."""

    def __post_init__(self) -> None:
        try:
            names.check_environment(self.environment)
        except ValueError as error:
            raise SettingsError(f"{CONTEXT_KEY}: {error}") from None
        self._check_int("leafLifetimeDays", self.leaf_lifetime_days, 1, MAX_LEAF_LIFETIME_DAYS)
        self._check_int("logRetentionDays", self.log_retention_days, 1, max(LOG_RETENTION_DAYS))
        if self.log_retention_days not in LOG_RETENTION_DAYS:
            self._fail(
                "logRetentionDays",
                f"{self.log_retention_days} is not a CloudWatch Logs retention period; "
                f"use one of {', '.join(map(str, LOG_RETENTION_DAYS))}",
            )
        if self.removal_policy not in REMOVAL_POLICIES:
            self._fail(
                "removalPolicy", f"{self.removal_policy!r} is not one of {', '.join(REMOVAL_POLICIES)}"
            )
        if self.environment in RETAINED_ENVIRONMENTS and self.removal_policy != "retain":
            self._fail("removalPolicy", f"must be 'retain' for {self.environment}")
        if self.account is not None and not (isinstance(self.account, str) and _ACCOUNT.match(self.account)):
            self._fail("account", f"{self.account!r} is not a 12-digit AWS account id (as a string)")
        if self.region is not None and not (isinstance(self.region, str) and _REGION.match(self.region)):
            self._fail("region", f"{self.region!r} is not an AWS region name such as 'eu-west-1'")

    @property
    def retain(self) -> bool:
        return self.removal_policy == "retain"

    @property
    def stage_name(self) -> str:
        return f"Hokusai-{self.environment}"

    def _fail(self, key: str, problem: str) -> None:
        raise SettingsError(f"{CONTEXT_KEY}.{self.environment}.{key}: {problem}")

    def _check_int(self, key: str, value: Any, low: int, high: int) -> None:
        # bool is an int in Python; `true` in cdk.json is not a number of days.
        if not isinstance(value, int) or isinstance(value, bool):
            self._fail(key, f"{value!r} is not a whole number")
        if not low <= value <= high:
            self._fail(key, f"{value} is outside {low}..{high}")

    @classmethod
    def from_context(cls, environment: str, raw: object) -> EnvironmentSettings:
        """Build from one entry of cdk.json's `hokusai:environments` (camelCase keys)."""
        if not isinstance(raw, Mapping):
            raise SettingsError(f"{CONTEXT_KEY}.{environment}: expected an object, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(_KEYS))
        if unknown:
            raise SettingsError(
                f"{CONTEXT_KEY}.{environment}.{unknown[0]}: unknown setting; expected {', '.join(_KEYS)}"
            )
        missing = [key for key in _REQUIRED if key not in raw]
        if missing:
            raise SettingsError(f"{CONTEXT_KEY}.{environment}.{missing[0]}: missing")
        return cls(environment=environment, **{_KEYS[key]: value for key, value in raw.items()})


def load_settings(raw: object) -> dict[str, EnvironmentSettings]:
    """Every environment's settings, in `runtime.names.ENVIRONMENTS` order.

    `raw` is the value of the context key (None when cdk.json does not have it).
    Each environment in ENVIRONMENTS must have an entry, and no other may.
    """
    if raw is None:
        raise SettingsError(f"{CONTEXT_KEY}: missing from the CDK context (cdk.json)")
    if not isinstance(raw, Mapping):
        raise SettingsError(f"{CONTEXT_KEY}: expected an object, got {type(raw).__name__}")
    for environment in raw:
        try:
            names.check_environment(environment)
        except ValueError as error:
            raise SettingsError(f"{CONTEXT_KEY}.{environment}: {error}") from None
    missing = [env for env in names.ENVIRONMENTS if env not in raw]
    if missing:
        raise SettingsError(f"{CONTEXT_KEY}.{missing[0]}: missing (every environment needs settings)")
    return {env: EnvironmentSettings.from_context(env, raw[env]) for env in names.ENVIRONMENTS}
