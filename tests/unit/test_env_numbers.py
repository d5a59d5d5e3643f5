"""Every count and duration from the environment is refused with its name when it is not one."""

from __future__ import annotations

import pytest

from runtime import env_numbers, names
from runtime.secrets.loader import refresh_seconds
from runtime.services.api_service import serve_api


@pytest.mark.parametrize("raw", ["x", "nan", "inf", "-1", "0", "86401", "1e400"])
def test_seconds_refuses_what_is_not_a_duration_in_range(raw):
    with pytest.raises(ValueError, match=f"VAR='{raw}': expected seconds, more than 0 and at most 86400"):
        env_numbers.seconds({"VAR": raw}, "VAR", default=1.0, maximum=86400)


def test_seconds_takes_a_number_and_defaults_when_blank():
    assert env_numbers.seconds({"VAR": " 2.5 "}, "VAR", default=1.0, maximum=10) == 2.5
    assert env_numbers.seconds({"VAR": " "}, "VAR", default=1.0, maximum=10) == 1.0
    assert env_numbers.seconds({}, "VAR", default=1.0, maximum=10) == 1.0


@pytest.mark.parametrize("raw", ["x", "1.5", "0", "11", "true"])
def test_whole_refuses_what_is_not_a_count_in_range(raw):
    with pytest.raises(ValueError, match=f"N='{raw}': expected a whole number from 1 to 10"):
        env_numbers.whole({"N": raw}, "N", default=3, low=1, high=10)


def test_whole_takes_a_count_and_defaults_when_blank():
    assert env_numbers.whole({"N": "7"}, "N", default=3, low=1, high=10) == 7
    assert env_numbers.whole({}, "N", default=3, low=1, high=10) == 3


@pytest.mark.parametrize("raw", ["-1", "nan", "inf", "soon"])
def test_the_refresh_interval_never_spins_or_stops(raw):
    """Before, `float()` took all of these: -1 made the refresh loop hammer Secrets Manager."""
    with pytest.raises(ValueError, match=names.ENV_REFRESH_SECONDS):
        refresh_seconds({names.ENV_REFRESH_SECONDS: raw})
    assert refresh_seconds({}) == 300.0


def test_serve_api_refuses_a_bad_refresh_interval_before_any_work():
    with pytest.raises(ValueError, match=names.ENV_REFRESH_SECONDS):
        serve_api(environ={names.ENV_ENVIRONMENT: "staging", names.ENV_REFRESH_SECONDS: "-5"})
