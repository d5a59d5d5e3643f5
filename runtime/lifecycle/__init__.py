"""AWS-side certificate lifecycle: first issuance, rotation, expiry checks (Lambda entry points).

- `runtime.lifecycle.issuance.handler`  CloudFormation custom resource (CDK Provider `onEvent`)
- `runtime.lifecycle.rotation.handler`  Secrets Manager rotation Lambda for `<identity>-identity`
- `runtime.lifecycle.expiry.handler`    scheduled: days to expiry and check failures to CloudWatch

This module holds only the settings the CDK half sets on those Lambdas, and imports nothing
outside the standard library, so the stacks can import it like `runtime.names`.
"""

from __future__ import annotations

ENV_LEAF_LIFETIME_DAYS = "HOKUSAI_MTLS_LEAF_LIFETIME_DAYS"
"""Rotation: lifetime of a rotated leaf in days; unset: `runtime.issuance.DEFAULT_LEAF_LIFETIME_DAYS`."""
ENV_KEY_TYPE = "HOKUSAI_MTLS_KEY_TYPE"
"""Rotation: key algorithm of a rotated leaf (`runtime.issuance.KeyType` value); unset: ecdsa-p256."""
ENV_SERVER_SANS = "HOKUSAI_MTLS_SERVER_SANS"
"""Rotation: comma-separated extra DNS names or IPs for the MLflow server's leaf (the custom
resource's `ServerSans`); unset: none beyond `mlflow.hokusai-<env>.local`."""

CA_IDENTITY = "ca"
"""The `Identity` dimension value under which the expiry check reports the trust bundle."""
