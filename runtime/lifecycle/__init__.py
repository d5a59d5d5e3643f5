"""AWS-side certificate lifecycle: first issuance, rotation, expiry checks (Lambda entry points). Imports certificates, secrets and the shared ground.

- `runtime.lifecycle.issuance.handler`  CloudFormation custom resource (CDK Provider `onEvent`)
- `runtime.lifecycle.rotation.handler`  Secrets Manager rotation Lambda for `<identity>-identity`
- `runtime.lifecycle.ca_rotation.handler`  Secrets Manager rotation Lambda for `ca-key-next`,
                                         `ca-key` and `ca-cert`: the CA rollover, step by step
- `runtime.lifecycle.expiry.handler`    scheduled: hours and days to expiry, check failures to CloudWatch

This module holds only the settings the CDK half sets on those Lambdas, and imports nothing
outside the standard library, so the stacks can import it like `runtime.names`.
"""

from __future__ import annotations

ENV_LEAF_LIFETIME_HOURS = "HOKUSAI_MTLS_LEAF_LIFETIME_HOURS"
"""Rotation: lifetime of a rotated leaf in hours (a fraction for compressed-time tests); unset:
`runtime.names.default_leaf_lifetime_hours`."""
ROTATION_WINDOW_HOURS = 1
"""Secrets Manager rotates at any time inside a window that opens on the schedule; the stacks
set it to this (`Duration`) for every identity's schedule, so a leaf is replaced at most `hours + 1` after
the one before it."""
SUB_DAY_ROTATION_HOURS = (4, 6, 8, 12)
"""Rotation periods below a day that Secrets Manager can keep: rate() windows start at midnight UTC and
must not reach into the next UTC day or window, so the period divides a day; 4 hours is its minimum."""


def check_rotation_hours(hours: int) -> int:
    """`hours`, or a ValueError naming the periods Secrets Manager can rotate at."""
    if isinstance(hours, bool) or not isinstance(hours, int):
        raise ValueError(f"expected a whole number of hours, got {hours!r}")
    if hours not in SUB_DAY_ROTATION_HOURS and not (hours >= 24 and hours % 24 == 0):
        allowed = ", ".join(map(str, SUB_DAY_ROTATION_HOURS))
        raise ValueError(
            f"{hours} hours: Secrets Manager rotates every {allowed} hours or whole days (24, 48, ...)"
        )
    return hours


def renews_before_half_life(rotation_hours: int, leaf_lifetime_hours: float) -> bool:
    """Whether a rotation every `rotation_hours` (within its window) replaces a leaf before half its life."""
    return 2 * (rotation_hours + ROTATION_WINDOW_HOURS) <= leaf_lifetime_hours


def longest_rotation_hours(leaf_lifetime_hours: float) -> int | None:
    """The longest period that still replaces a leaf before half its life (period + window <= half),
    renewal at half-life as Istio and Linkerd do it; None when even 4 hours is too slow."""
    fitting = [h for h in SUB_DAY_ROTATION_HOURS if renews_before_half_life(h, leaf_lifetime_hours)]
    days = int((leaf_lifetime_hours / 2 - ROTATION_WINDOW_HOURS) // 24)
    if days >= 1:
        return days * 24
    return fitting[-1] if fitting else None


MISSED_ROTATION_PAGE_SHARE = 0.75
"""A default period leaves room for one missed rotation: the leaf is then at most 2 periods + the window
old, and should still be above the page alarm (25 % of its life left)."""


def default_rotation_hours(leaf_lifetime_hours: float) -> int | None:
    """The longest allowed period (`longest_rotation_hours`) after which one missed rotation only
    warns, not pages (8 hours for 24-hour leaves, 48 for a week); where none does, the longest."""
    longest = longest_rotation_hours(leaf_lifetime_hours)
    if longest is None:
        return None
    candidates = [*SUB_DAY_ROTATION_HOURS, *range(24, longest + 1, 24)]
    calm = [
        h
        for h in candidates
        if h <= longest and 2 * h + ROTATION_WINDOW_HOURS <= MISSED_ROTATION_PAGE_SHARE * leaf_lifetime_hours
    ]
    return max(calm) if calm else longest


def rotation_schedule_expression(hours: int) -> str:
    """Secrets Manager's `ScheduleExpression` for a rotation every `hours` (`check_rotation_hours`)."""
    check_rotation_hours(hours)
    if hours < 24:
        return f"rate({hours} hours)"
    days = hours // 24
    return f"rate({days} day{'s' if days > 1 else ''})"


ENV_KEY_TYPE = "HOKUSAI_MTLS_KEY_TYPE"
"""Rotation: key algorithm of a rotated leaf (`runtime.certificates.issuance.KeyType` value); unset: ecdsa-p256."""
ENV_SERVER_SANS = "HOKUSAI_MTLS_SERVER_SANS"
"""Rotation: comma-separated extra DNS names or IPs for the MLflow server's leaf (the custom
resource's `ServerSans`); unset: none beyond `mlflow.hokusai-<env>.local`."""

ENV_CA_SOURCE = "HOKUSAI_MTLS_CA_SOURCE"
"""Issuance and CA rotation: `issued` (we make the environment's CA) or `imported` (the platform's
CA, uploaded with `hokusai-mtls certs upload`: never created, never rolled over automatically)."""
CA_SOURCE_ISSUED, CA_SOURCE_IMPORTED = "issued", "imported"
CA_SOURCES = (CA_SOURCE_ISSUED, CA_SOURCE_IMPORTED)
ENV_CA_ROLLOVER_START_DAYS = "HOKUSAI_MTLS_CA_ROLLOVER_START_DAYS"
"""CA rotation: begin a rollover once the issuing CA has at most this many days left."""
ENV_CA_ROLLOVER_WAIT_DAYS = "HOKUSAI_MTLS_CA_ROLLOVER_WAIT_DAYS"
"""CA rotation: at least this many days between rollover steps (every service loads the new
bundle, then its new leaf, in that time); also how often the CA secrets' rotation checks."""

CA_IDENTITY = "ca"
"""The `Identity` dimension value under which the expiry check reports the trust bundle."""

MAX_FUNCTION_NAME = 64
"""Lambda's limit on a function name."""
CA_ROTATION_PURPOSE = "ca-rotation"


def function_name(environment: str, purpose: str) -> str:
    """`hokusai-mtls-<env>-<purpose>` (e.g. `hokusai-mtls-staging-ca-rotation`): a lifecycle Lambda's name,
    which the Monitoring stack alarms on without a cross-stack export. Not checked against
    `MAX_FUNCTION_NAME` here: `check_function_name` is, by the settings for every declared name."""
    return f"hokusai-mtls-{environment}-{purpose}"


def rotation_purpose(identity_name: str) -> str:
    """The purpose in the name of `identity_name`'s rotation function (`api-rotation`)."""
    return f"{identity_name}-rotation"


def check_function_name(environment: str, purpose: str) -> str:
    """`function_name(...)`, or a ValueError saying how long it is: a long environment name with a long
    identity name can pass Lambda's 64 characters."""
    name = function_name(environment, purpose)
    if len(name) > MAX_FUNCTION_NAME:
        raise ValueError(
            f"the Lambda function {name!r} would be {len(name)} characters; Lambda allows "
            f"{MAX_FUNCTION_NAME}: shorten the environment's or the identity's name"
        )
    return name
