"""A key's usage summary on SQLite, over rows inserted with known values; every expectation by hand."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
import sqlalchemy as sa

from runtime.keys import migrate
from runtime.keys.schema import ApiKeyUsage
from runtime.keys.usage_summary import check_window, summarize

KEY = uuid.UUID("00000000-0000-4000-8000-000000000001")
OTHER = uuid.UUID("00000000-0000-4000-8000-000000000002")
T0 = dt.datetime(2027, 5, 10, 9, 0, tzinfo=dt.UTC)


@pytest.fixture
def engine(tmp_path):
    engine = migrate.engine(f"sqlite:///{tmp_path}/keys.db")
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


def insert(engine, rows: list[dict]) -> None:
    """Rows of (key, endpoint, at, ms, status); the key defaults to KEY."""
    with engine.begin() as connection:
        connection.execute(
            sa.insert(ApiKeyUsage.__table__),
            [
                {
                    "id": uuid.uuid4(),
                    "api_key_id": row.get("key", KEY),
                    "endpoint": row.get("endpoint", "GET /a"),
                    "timestamp": row["at"],
                    "response_time_ms": row.get("ms", 1),
                    "status_code": row.get("status", 200),
                }
                for row in rows
            ],
        )


def minutes(n: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=n)


def test_totals_endpoints_and_statuses(engine):
    insert(
        engine,
        [
            *({"at": minutes(n), "endpoint": "GET /runs", "status": 200} for n in range(5)),
            *({"at": minutes(10 + n), "endpoint": "POST /predict", "status": 429} for n in range(3)),
            {"at": minutes(20), "endpoint": "GET /health", "status": 500},
            {"at": minutes(21), "endpoint": "GET /runs", "status": 404},
        ],
    )
    summary = summarize(engine, KEY, since=T0, until=T0 + dt.timedelta(hours=1))
    assert summary["key_id"] == str(KEY)
    assert summary["requests"] == 10
    assert summary["endpoints"] == [
        {"endpoint": "GET /runs", "requests": 6},
        {"endpoint": "POST /predict", "requests": 3},
        {"endpoint": "GET /health", "requests": 1},
    ]
    assert summary["statuses"] == {"200": 5, "404": 1, "429": 3, "500": 1}
    assert summary["period"] == "hour"
    assert summary["since"] == T0.isoformat() and summary["until"] == (T0 + dt.timedelta(hours=1)).isoformat()


def test_endpoints_of_equal_count_are_ordered_by_name(engine):
    insert(
        engine,
        [{"at": minutes(n), "endpoint": name} for n, name in enumerate(["GET /b", "GET /a", "GET /c"])],
    )
    summary = summarize(engine, KEY, since=T0, until=minutes(60))
    assert [e["endpoint"] for e in summary["endpoints"]] == ["GET /a", "GET /b", "GET /c"]


def test_requests_per_hour_across_two_hours(engine):
    insert(
        engine,
        [
            {"at": minutes(0)},
            {"at": minutes(59.99)},
            {"at": minutes(60)},  # the next hour starts here
            {"at": minutes(61)},
            {"at": minutes(119)},
            {"at": minutes(125)},
        ],
    )
    summary = summarize(engine, KEY, since=T0, until=T0 + dt.timedelta(hours=3))
    assert summary["periods"] == [
        {"start": "2027-05-10T09:00:00Z", "requests": 2},
        {"start": "2027-05-10T10:00:00Z", "requests": 3},
        {"start": "2027-05-10T11:00:00Z", "requests": 1},
    ]


def test_requests_per_day(engine):
    midnight = dt.datetime(2027, 5, 11, tzinfo=dt.UTC)
    insert(
        engine,
        [
            {"at": midnight - dt.timedelta(seconds=1)},
            {"at": midnight},
            {"at": midnight + dt.timedelta(hours=23)},
            {"at": midnight + dt.timedelta(days=2, hours=5)},
        ],
    )
    summary = summarize(
        engine,
        KEY,
        since=midnight - dt.timedelta(days=1),
        until=midnight + dt.timedelta(days=5),
        period="day",
    )
    assert summary["periods"] == [
        {"start": "2027-05-10T00:00:00Z", "requests": 1},
        {"start": "2027-05-11T00:00:00Z", "requests": 2},
        {"start": "2027-05-13T00:00:00Z", "requests": 1},
    ]
    assert summary["period"] == "day"


def nearest_rank(values: list[int], p: int) -> int:
    """The smallest value at least p % of the values are at or below: sorted[ceil(p*n/100) - 1]."""
    ordered = sorted(values)
    rank = -(-p * len(ordered) // 100)  # ceil in integers
    return ordered[rank - 1]


def test_percentiles_of_one_to_a_hundred_milliseconds(engine):
    values = list(range(100, 0, -1))  # inserted out of order
    insert(engine, [{"at": minutes(n * 0.5), "ms": ms} for n, ms in enumerate(values)])
    times = summarize(engine, KEY, since=T0, until=minutes(60))["response_time_ms"]
    assert times == {"p50": 50, "p95": 95, "p99": 99, "max": 100}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([7], {"p50": 7, "p95": 7, "p99": 7, "max": 7}),
        ([10, 20], {"p50": 10, "p95": 20, "p99": 20, "max": 20}),
        ([5, 1, 3], {"p50": 3, "p95": 5, "p99": 5, "max": 5}),
        ([1] * 98 + [500, 900], {"p50": 1, "p95": 1, "p99": 500, "max": 900}),
        (list(range(1, 11)), {"p50": 5, "p95": 10, "p99": 10, "max": 10}),
        (list(range(1, 201)), {"p50": 100, "p95": 190, "p99": 198, "max": 200}),
    ],
)
def test_percentiles_are_nearest_rank(engine, values, expected):
    insert(engine, [{"at": minutes(n * 0.1), "ms": ms} for n, ms in enumerate(values)])
    times = summarize(engine, KEY, since=T0, until=minutes(60))["response_time_ms"]
    assert times == expected
    assert times == {f"p{p}": nearest_rank(values, p) for p in (50, 95, 99)} | {"max": max(values)}


def test_an_empty_window_has_no_times(engine):
    insert(engine, [{"at": minutes(90)}])
    summary = summarize(engine, KEY, since=T0, until=minutes(60))
    assert summary["requests"] == 0
    assert summary["endpoints"] == [] and summary["statuses"] == {} and summary["periods"] == []
    assert summary["response_time_ms"] is None


def test_since_is_inclusive_and_until_exclusive(engine):
    since, until = minutes(10), minutes(20)
    insert(
        engine,
        [
            {"at": since - dt.timedelta(microseconds=1), "endpoint": "GET /before"},
            {"at": since, "endpoint": "GET /first"},
            {"at": until - dt.timedelta(microseconds=1), "endpoint": "GET /last"},
            {"at": until, "endpoint": "GET /after"},
        ],
    )
    summary = summarize(engine, KEY, since=since, until=until)
    assert summary["requests"] == 2
    assert {e["endpoint"] for e in summary["endpoints"]} == {"GET /first", "GET /last"}


def test_another_keys_rows_are_not_counted(engine):
    insert(
        engine,
        [
            {"at": minutes(1), "ms": 10},
            {"at": minutes(2), "key": OTHER, "ms": 9999, "endpoint": "GET /other", "status": 500},
            {"at": minutes(3), "key": OTHER, "ms": 9999},
        ],
    )
    summary = summarize(engine, KEY, since=T0, until=minutes(60))
    assert summary["requests"] == 1
    assert summary["endpoints"] == [{"endpoint": "GET /a", "requests": 1}]
    assert summary["statuses"] == {"200": 1}
    assert summary["response_time_ms"] == {"p50": 10, "p95": 10, "p99": 10, "max": 10}
    assert summarize(engine, uuid.uuid4(), since=T0, until=minutes(60))["requests"] == 0


def test_a_window_in_another_time_zone_means_the_same_instants(engine):
    """10:10 to 10:20 at +02:00 is 08:10 to 08:20 UTC, whatever the database keeps."""
    plus_two = dt.timezone(dt.timedelta(hours=2))
    insert(engine, [{"at": minutes(-45)}, {"at": minutes(45)}])  # 08:15 and 09:45 UTC
    since = dt.datetime(2027, 5, 10, 10, 10, tzinfo=plus_two)
    summary = summarize(engine, KEY, since=since, until=since + dt.timedelta(minutes=10))
    assert summary["requests"] == 1
    assert summary["periods"] == [{"start": "2027-05-10T08:00:00Z", "requests": 1}]


# --- check_window ------------------------------------------------------------------------------------
def test_a_good_window_passes():
    check_window(T0, T0 + dt.timedelta(hours=1), "hour")
    check_window(T0, T0 + dt.timedelta(days=31), "hour")  # exactly the most hours
    check_window(T0, T0 + dt.timedelta(days=31 * 24), "day")


@pytest.mark.parametrize(
    ("since", "until", "period", "message"),
    [
        (T0, T0 + dt.timedelta(hours=1), "week", "period"),
        (T0, T0 + dt.timedelta(hours=1), "HOUR", "period"),
        (T0, T0, "hour", "after since"),
        (T0, T0 - dt.timedelta(seconds=1), "hour", "after since"),
        (T0.replace(tzinfo=None), T0 + dt.timedelta(hours=1), "hour", "time zone"),
        (T0, (T0 + dt.timedelta(hours=1)).replace(tzinfo=None), "hour", "time zone"),
        (T0, T0 + dt.timedelta(days=31, seconds=1), "hour", "at most 744"),
        (T0, T0 + dt.timedelta(days=31 * 24 + 1), "day", "at most 744"),
    ],
)
def test_a_bad_window_is_refused_saying_why(since, until, period, message):
    with pytest.raises(ValueError, match=message):
        check_window(since, until, period)


def test_summarize_checks_its_window(engine):
    with pytest.raises(ValueError, match="period"):
        summarize(engine, KEY, since=T0, until=minutes(60), period="minute")
