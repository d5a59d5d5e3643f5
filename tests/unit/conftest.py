"""Fixtures of the lifecycle unit tests (moto in-process; `secretsmanager` is in tests/conftest.py)."""

from __future__ import annotations

import pytest

from runtime.lifecycle import issuance
from tests.conftest import REGION
from tests.support.lifecycle import ENVIRONMENT, create_shells, rotation_function


@pytest.fixture
def deployed(secretsmanager):
    """The shells, filled by first issuance, and a rotation function moto knows of."""
    create_shells(secretsmanager)
    issuance.handler(
        {"RequestType": "Create", "ResourceProperties": {"Environment": ENVIRONMENT}},
        None,
        client=secretsmanager,
    )
    return secretsmanager, rotation_function(REGION)
