"""The variant app's settings: staging with what cdk.json does not exercise (tests/infra/conftest.py).

Permissive mode, an imported VPC, cluster and namespace, an ECR image and a public registry image,
two trusted proxy networks of an ALB in mutual-TLS verify mode, an auth service URL with a port
and a path, the Redis URL secret, service scopes, a CORS origin, and an imported CA whose
certificates are identified by CN.
"""

from __future__ import annotations

import copy

from runtime import names
from stacks.settings import CONTEXT_KEY

VARIANT_ENVIRONMENT = "staging"
VARIANT_IMPORTS = {
    "vpc": {
        "import": {
            "vpcId": "vpc-0123456789abcdef0",
            "vpcCidrBlock": "10.99.0.0/16",
            "availabilityZones": ["eu-west-1a", "eu-west-1b"],
            "privateSubnetIds": ["subnet-0123456789abcdef0", "subnet-0fedcba9876543210"],
            "privateSubnetRouteTableIds": ["rtb-0123456789abcdef0", "rtb-0fedcba9876543210"],
        }
    },
    "cluster": {"import": {"clusterName": "platform-staging"}},
    "namespace": {
        "import": {
            "namespaceId": "ns-0123456789abcdef",
            "namespaceArn": "arn:aws:servicediscovery:eu-west-1:123456789012:namespace/ns-0123456789abcdef",
        }
    },
}
VARIANT_IMAGES = {
    "mlflow": {"dockerfile": "docker/Dockerfile.mlflow"},
    "api": {"uri": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/hokusai/api:1.4.2"},
    "worker": {"uri": "ghcr.io/hokusai/worker@sha256:" + "ab" * 32},
}
VARIANT_TRUSTED_PROXIES = ["10.99.0.0/24", "10.99.1.0/24"]
VARIANT_AUTH_SERVICE_URL = "https://auth.staging.example.com:8443/v2"
VARIANT_CORS_ORIGINS = ["https://ui.staging.example.com"]
VARIANT_REDIS_URL_SECRET = "hokusai/staging/redis-url"
VARIANT_SERVICE_SCOPES = {
    "api": ["mlflow:read", "mlflow:write"],
    "worker": ["mlflow:write"],
    "reporter": ["mlflow:read"],
}


def variant_settings_context(context: dict) -> dict:
    """cdk.json's environments (from `context`) with staging switched to every alternative tested."""
    raw = copy.deepcopy(context[CONTEXT_KEY])
    raw[VARIANT_ENVIRONMENT].update(
        copy.deepcopy(VARIANT_IMPORTS),
        mtlsMode=names.MTLS_MODE_PERMISSIVE,
        images=copy.deepcopy(VARIANT_IMAGES),
        internalCidrs=["10.99.0.0/16"],
        trustedProxyCidrs=list(VARIANT_TRUSTED_PROXIES),
        trustedProxyKind=names.PROXY_KIND_ALB,
        corsAllowedOrigins=list(VARIANT_CORS_ORIGINS),
        caSource="imported",
        cnFallback=True,
        authServiceUrl=VARIANT_AUTH_SERVICE_URL,
        redisUrlSecretName=VARIANT_REDIS_URL_SECRET,
        serviceScopes=copy.deepcopy(VARIANT_SERVICE_SCOPES),
    )
    return raw
