"""The boto3 clients the Lambda handlers share: made on first use, reused while the container lives.

Created lazily (not at import) so importing a handler in a test, or in the CDK app, makes no
client and needs no region; each handler also accepts a client, which tests pass from moto.
"""

from __future__ import annotations

import functools
import os

import boto3
from botocore.config import Config

from runtime.secrets import secret_store


@functools.cache
def secrets_client():
    """Secrets Manager with botocore's standard retries (`runtime.secrets.secret_store.make_client`)."""
    return secret_store.make_client()


@functools.cache
def cloudwatch_client():
    config = Config(retries={"mode": "standard", "total_max_attempts": secret_store.RETRY_ATTEMPTS})
    region = os.environ.get("AWS_REGION") or None
    return boto3.session.Session().client("cloudwatch", region_name=region, config=config)
