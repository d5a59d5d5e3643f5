"""Fixtures of the lifecycle unit tests (moto in-process; `secretsmanager` is in tests/conftest.py)."""

from __future__ import annotations

import pytest

from runtime.lifecycle import issuance
from tests.conftest import REGION
from tests.support.asgi import CountingValidator, build_middleware
from tests.support.certs import new_ca
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


# --- the middleware tests (tests/support/asgi.py) -------------------------------------------------
@pytest.fixture
def ca():
    return new_ca()


@pytest.fixture
def validator():
    return CountingValidator()


@pytest.fixture
def middleware(validator):
    """`middleware(**options)` builds one over the counting validator."""
    return lambda **options: build_middleware(validator, **options)
