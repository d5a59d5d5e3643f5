"""A key's usage over a period (seed 002 §7): requests per endpoint, per hour or day, per status, and
response-time percentiles, computed by the database over the rows `runtime.keys.usage` wrote.

Every figure is one indexed query over `(api_key_id, timestamp)`; the percentiles are nearest-rank
(the smallest time at least p % of the requests took, what PostgreSQL's `percentile_disc` gives),
found with `ORDER BY ... OFFSET`, which SQLite and PostgreSQL both have. A window holds at most
`MAX_BUCKETS` periods (31 days by the hour, 744 days by the day) and the summary lists the
`TOP_ENDPOINTS` busiest endpoints, so an answer is bounded whatever was recorded.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid

import sqlalchemy as sa

from runtime.keys.schema import ApiKeyUsage

PERIODS = {"hour": dt.timedelta(hours=1), "day": dt.timedelta(days=1)}
MAX_BUCKETS = 31 * 24
TOP_ENDPOINTS = 50
PERCENTILES = (50, 95, 99)


def check_window(since: dt.datetime, until: dt.datetime, period: str) -> None:
    """ValueError naming what is wrong: the period, the order, or a window of too many periods."""
    if period not in PERIODS:
        raise ValueError(f"period: expected one of {', '.join(PERIODS)}, got {period!r}")
    if since.tzinfo is None or until.tzinfo is None:
        raise ValueError("since/until: expected times with their time zone")
    if until <= since:
        raise ValueError("until: expected a time after since")
    if (until - since) / PERIODS[period] > MAX_BUCKETS:
        raise ValueError(
            f"since/until: at most {MAX_BUCKETS} periods of one {period}; choose a longer period"
        )


def _bucket(dialect: str, period: str, column):
    """The start of the period a row falls into, as text `YYYY-MM-DDTHH:00:00` (UTC)."""
    if dialect == "postgresql":
        truncated = sa.func.date_trunc(period, sa.func.timezone("UTC", column))
        return sa.func.to_char(truncated, 'YYYY-MM-DD"T"HH24:00:00')
    text = "%Y-%m-%dT%H:00:00" if period == "hour" else "%Y-%m-%dT00:00:00"
    return sa.func.strftime(text, column)


def summarize(
    engine: sa.Engine, key_id: uuid.UUID, *, since: dt.datetime, until: dt.datetime, period: str = "hour"
) -> dict:
    check_window(since, until, period)
    usage = ApiKeyUsage.__table__.c
    # In UTC, as the rows are written: SQLite keeps a time's wall clock only, and compares it as text.
    start, end = since.astimezone(dt.UTC), until.astimezone(dt.UTC)
    window = sa.and_(usage.api_key_id == key_id, usage.timestamp >= start, usage.timestamp < end)
    bucket = _bucket(engine.dialect.name, period, usage.timestamp).label("bucket")
    with engine.connect() as connection:
        total = connection.scalar(sa.select(sa.func.count()).where(window)) or 0
        endpoints = connection.execute(
            sa.select(usage.endpoint, sa.func.count().label("requests"))
            .where(window)
            .group_by(usage.endpoint)
            .order_by(sa.desc("requests"), usage.endpoint)
            .limit(TOP_ENDPOINTS)
        ).all()
        statuses = connection.execute(
            sa.select(usage.status_code, sa.func.count()).where(window).group_by(usage.status_code)
        ).all()
        periods = connection.execute(
            sa.select(bucket, sa.func.count()).where(window).group_by(bucket).order_by(bucket)
        ).all()
        times = None
        if total:
            times = {
                f"p{p}": connection.scalar(
                    sa.select(usage.response_time_ms)
                    .where(window)
                    .order_by(usage.response_time_ms)
                    .offset(math.ceil(p / 100 * total) - 1)
                    .limit(1)
                )
                for p in PERCENTILES
            }
            times["max"] = connection.scalar(sa.select(sa.func.max(usage.response_time_ms)).where(window))
    return {
        "key_id": str(key_id),
        "since": since.isoformat(),
        "until": until.isoformat(),
        "period": period,
        "requests": total,
        "endpoints": [{"endpoint": endpoint, "requests": count} for endpoint, count in endpoints],
        "statuses": {str(status): count for status, count in sorted(statuses)},
        "periods": [{"start": f"{start}Z", "requests": count} for start, count in periods],
        "response_time_ms": times,
    }
