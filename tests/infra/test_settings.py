"""cdk.json's `hokusai:environments`: a bad setting fails with a message naming it and its environment."""

from __future__ import annotations

import copy

import pytest

from runtime import names
from stacks.settings import CONTEXT_KEY, EnvironmentSettings, SettingsError, load_settings

VALID = {
    "development": {"leafLifetimeDays": 365, "logRetentionDays": 14, "removalPolicy": "destroy"},
    "staging": {"leafLifetimeDays": 90, "logRetentionDays": 90, "removalPolicy": "destroy"},
    "production": {"leafLifetimeDays": 90, "logRetentionDays": 365, "removalPolicy": "retain"},
}


def with_setting(env: str, key: str, value: object) -> dict:
    raw = copy.deepcopy(VALID)
    raw[env][key] = value
    return raw


def test_cdk_json_settings_load(cdk_json_settings):
    settings = load_settings(cdk_json_settings)
    assert tuple(settings) == names.ENVIRONMENTS
    assert settings["production"].retain
    assert not settings["development"].retain
    assert [settings[env].leaf_lifetime_days for env in names.ENVIRONMENTS] == [365, 90, 90]
    assert all(s.account is None and s.region is None for s in settings.values())


def test_account_and_region_are_optional_and_checked():
    raw = with_setting("staging", "account", "123456789012")
    raw["staging"]["region"] = "eu-west-1"
    staging = load_settings(raw)["staging"]
    assert (staging.account, staging.region) == ("123456789012", "eu-west-1")


@pytest.mark.parametrize(
    ("env", "key", "value", "problem"),
    [
        ("staging", "leafLifetimeDays", 0, "outside"),
        ("staging", "leafLifetimeDays", "90", "whole number"),
        ("development", "leafLifetimeDays", True, "whole number"),
        ("production", "logRetentionDays", 42, "CloudWatch Logs retention"),
        ("staging", "removalPolicy", "snapshot", "not one of"),
        ("production", "removalPolicy", "destroy", "must be 'retain'"),
        ("staging", "account", 123456789012, "12-digit"),
        ("staging", "region", "Europe", "region"),
        ("development", "leafLifetimeDay", 30, "unknown setting"),
    ],
)
def test_bad_setting_names_environment_and_setting(env, key, value, problem):
    with pytest.raises(SettingsError) as caught:
        load_settings(with_setting(env, key, value))
    message = str(caught.value)
    assert f"{CONTEXT_KEY}.{env}.{key}" in message
    assert problem in message


def test_missing_setting_is_named():
    raw = copy.deepcopy(VALID)
    del raw["staging"]["logRetentionDays"]
    with pytest.raises(SettingsError, match=rf"{CONTEXT_KEY}\.staging\.logRetentionDays: missing"):
        load_settings(raw)


def test_missing_and_unknown_environments_are_named():
    raw = copy.deepcopy(VALID)
    del raw["staging"]
    with pytest.raises(SettingsError, match=rf"{CONTEXT_KEY}\.staging: missing"):
        load_settings(raw)
    with pytest.raises(SettingsError, match=r"unknown environment 'qa'"):
        load_settings({**VALID, "qa": VALID["staging"]})
    with pytest.raises(SettingsError, match="missing from the CDK context"):
        load_settings(None)


def test_settings_are_keyword_only():
    with pytest.raises(TypeError):
        EnvironmentSettings("staging", 90, 90, "destroy")  # type: ignore[misc]
