"""The variant app's settings: staging with what cdk.json does not exercise (tests/infra/conftest.py).

Permissive mode, an imported VPC, cluster and namespace, an ECR image and a public registry image,
two trusted proxy networks of an ALB in mutual-TLS verify mode, an auth service URL with a port
and a path, the Redis URL secret, service scopes, a CORS origin, an imported CA whose
certificates are identified by CN, and task sizes other than the defaults (a derived and a set
worker count).
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

VARIANT_TASK_SIZES = {
    "mlflow": {"cpu": 4096, "memoryMiB": 12288},  # 4 vCPU, workers unset: 4
    "api": {"cpu": 2048, "memoryMiB": 5120, "workers": 6},  # 2 vCPU, at most 8
    "worker": {"cpu": 256, "memoryMiB": 512},
}
VARIANT_WORKERS = {"mlflow": "4", "api": "6"}
"""HOKUSAI_MTLS_WORKERS that VARIANT_TASK_SIZES give mlflow and api; the worker service gets none."""


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
        taskSizes=copy.deepcopy(VARIANT_TASK_SIZES),
    )
    return raw
