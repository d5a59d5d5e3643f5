"""cdk.json's `hokusai:environments`: a bad setting fails with a message naming it and its environment."""

from __future__ import annotations

import copy
import json

import pytest

from runtime import names
from stacks.settings import CONTEXT_KEY, EnvironmentSettings, SettingsError, load_settings
from stacks.settings_checks import Where
from stacks.settings_network import CreateVpc, ImportCluster, ImportNamespace, ImportVpc
from stacks.settings_services import ApiKeyStore, ImageSource, TaskSize, parse_task_sizes


def _required(env: str, second_octet: int) -> dict:
    return {
        "vpc": {"create": {"cidr": f"10.{second_octet}.0.0/16"}},
        "mlflow": {
            "backendStoreSecretName": f"hokusai/{env}/mlflow-backend-store-uri",
            "artifactsDestination": f"s3://hokusai-{env}-mlflow/artifacts",
        },
    }


VALID = {
    "development": {
        "leafLifetimeHours": 168,
        "logRetentionDays": 14,
        "removalPolicy": "destroy",
        **_required("development", 10),
    },
    "staging": {
        "logRetentionDays": 90,
        "removalPolicy": "destroy",
        **_required("staging", 20),
    },
    "production": {
        "leafLifetimeHours": 24,
        "logRetentionDays": 365,
        "removalPolicy": "retain",
        **_required("production", 30),
    },
}
IMPORTED_VPC = {
    "import": {
        "vpcId": "vpc-0123456789abcdef0",
        "vpcCidrBlock": "10.99.0.0/16",
        "availabilityZones": ["eu-west-1a", "eu-west-1b"],
        "privateSubnetIds": ["subnet-0123456789abcdef0", "subnet-0fedcba9876543210"],
    }
}
NAMESPACE = {
    "import": {
        "namespaceId": "ns-0123456789abcdef",
        "namespaceArn": "arn:aws:servicediscovery:eu-west-1:123456789012:namespace/ns-0123456789abcdef",
    }
}


RULE = {"identities": ["api"], "methods": ["GET"], "paths": ["/health"]}
"""A valid route-policy rule, for the cases that break one of its fields."""


def with_setting(env: str, key: str, value: object) -> dict:
    raw = copy.deepcopy(VALID)
    raw[env][key] = value
    return raw


def test_cdk_json_settings_load(cdk_json_settings):
    settings = load_settings(cdk_json_settings)
    assert tuple(settings) == names.ENVIRONMENTS
    assert settings["production"].retain
    assert not settings["development"].retain
    assert [settings[env].leaf_lifetime_hours for env in names.ENVIRONMENTS] == [168, 24, 24]
    assert [settings[env].rotation_hours for env in names.ENVIRONMENTS] == [48, 8, 8]  # one miss: a warning
    assert all(s.account is None and s.region is None for s in settings.values())


def test_account_and_region_are_optional_and_checked():
    raw = with_setting("staging", "account", "123456789012")
    raw["staging"]["region"] = "eu-west-1"
    staging = load_settings(raw)["staging"]
    assert (staging.account, staging.region) == ("123456789012", "eu-west-1")


@pytest.mark.parametrize(
    ("env", "key", "value", "problem"),
    [
        ("staging", "leafLifetimeHours", 9, "outside 10..9528"),
        ("staging", "leafLifetimeHours", 9529, "outside 10..9528"),
        ("staging", "leafLifetimeHours", "24", "whole number"),
        ("staging", "leafLifetimeHours", 24.5, "whole number"),
        ("development", "leafLifetimeHours", True, "whole number"),
        ("staging", "leafLifetimeDays", 90, "use leafLifetimeHours (90 days is 2160"),
        ("staging", "rotationDays", 30, "use rotationHours (30 days is 720"),
        ("staging", "certificateExpiryAlarmDays", 30, "the leaf alarms follow the lifetime now"),
        ("staging", "rotationHours", 5, "Secrets Manager rotates every 4, 6, 8, 12 hours or whole days"),
        ("staging", "rotationHours", 36, "whole days"),
        ("staging", "rotationHours", "8", "whole number of hours"),
        ("staging", "rotationHours", 12, "12 is too slow for leafLifetimeHours 24"),
        ("production", "rotationHours", 24, "24 is too slow"),
        ("production", "logRetentionDays", 42, "CloudWatch Logs retention"),
        ("staging", "removalPolicy", "snapshot", "not one of"),
        ("production", "removalPolicy", "destroy", "must be 'retain'"),
        ("staging", "account", 123456789012, "12-digit"),
        ("staging", "region", "Europe", "region"),
        ("development", "leafLifetimeDay", 30, "unknown setting"),
        ("staging", "mtlsMode", "lenient", "not one of strict, permissive, off"),
        ("staging", "alarmEmails", "ops@example.com", "expected a list"),
        ("staging", "alarmEmails[1]", ["ops@example.com", "ops"], "not an e-mail address"),
        ("staging", "alarmEmails", ["ops@example.com", "ops@example.com"], "twice"),
        ("staging", "mtlsFailureRatePercent", 0, "more than 0"),
        ("staging", "mtlsFailureRatePercent", 101, "at most 100"),
        ("staging", "mtlsFailureRatePercent", "1%", "not a number"),
        ("staging", "mtlsFailureMinRequests", 0, "outside"),
        ("staging", "images.api", {"file": "x"}, '{"dockerfile": ...} or {"uri": ...}'),
        ("staging", "images.api.dockerfile", "Dockerfile.api", "a Dockerfile in docker/"),
        ("staging", "images.api.dockerfile", "docker/Dockerfile.missing", "does not exist"),
        ("staging", "images.api.uri", "hokusai/api", "with a tag or digest"),
        ("staging", "desiredCounts.worker", -1, "outside 0..50"),
        ("staging", "taskSizes", [], "expected an object, got list"),
        ("staging", "taskSizes.reporter", {"reporter": {"cpu": 256, "memoryMiB": 512}}, "unknown setting"),
        ("staging", "taskSizes.api", {"api": 512}, "expected an object, got int"),
        ("staging", "taskSizes.api.memoryMiB", {"api": {"cpu": 512}}, "missing"),
        ("staging", "taskSizes.api.memory", {"api": {"cpu": 512, "memory": 1024}}, "unknown setting"),
        (
            "staging",
            "taskSizes.mlflow.memoryMiB",
            {"mlflow": {"cpu": 1024, "memoryMiB": 1024}},
            "1024 is not a memory size Fargate runs with cpu 1024 (1 vCPU): 2048 to 8192 in steps of 1024 MiB",
        ),
        (
            "production",
            "taskSizes.worker.memoryMiB",
            {"worker": {"cpu": 256, "memoryMiB": 1536}},
            "cpu 256 (0.25 vCPU): 512, 1024 or 2048 MiB",
        ),
        ("staging", "taskSizes.api.memoryMiB", {"api": {"cpu": 512, "memoryMiB": 5120}}, "1024 to 4096"),
        (
            "staging",
            "taskSizes.api.memoryMiB",
            {"api": {"cpu": 8192, "memoryMiB": 18432}},
            "16384 to 61440 in steps of 4096",
        ),
        (
            "staging",
            "taskSizes.api.memoryMiB",
            {"api": {"cpu": 16384, "memoryMiB": 131072}},
            "32768 to 122880 in steps of 8192",
        ),
        (
            "staging",
            "taskSizes.api.memoryMiB",
            {"api": {"cpu": 512, "memoryMiB": "1GB"}},
            "not a whole number",
        ),
        (
            "development",
            "taskSizes.worker.cpu",
            {"worker": {"cpu": 768, "memoryMiB": 2048}},
            "768 is not a Fargate task cpu value: one of 256, 512, 1024, 2048, 4096, 8192, 16384",
        ),
        ("staging", "taskSizes.api.cpu", {"api": {"cpu": 0.5, "memoryMiB": 1024}}, "not a whole number"),
        (
            "staging",
            "taskSizes.api.workers",
            {"api": {"cpu": 512, "memoryMiB": 1024, "workers": 0}},
            "0 is outside 1..2: at least 1 and at most 4 per vCPU (cpu 512 is 0.5 vCPU)",
        ),
        (
            "production",
            "taskSizes.mlflow.workers",
            {"mlflow": {"cpu": 1024, "memoryMiB": 2048, "workers": 5}},
            "5 is outside 1..4: at least 1 and at most 4 per vCPU (cpu 1024 is 1 vCPU)",
        ),
        (
            "staging",
            "taskSizes.api.workers",
            {"api": {"cpu": 512, "memoryMiB": 1024, "workers": True}},
            "not a whole number",
        ),
        (
            "staging",
            "taskSizes.api.workers",
            {"api": {"cpu": 512, "memoryMiB": 1024, "workers": None}},
            "not a whole number",
        ),
        (
            "staging",
            "taskSizes.worker.workers",
            {"worker": {"cpu": 512, "memoryMiB": 1024, "workers": 1}},
            "only mlflow and api run worker processes (HOKUSAI_MTLS_WORKERS)",
        ),
        ("staging", "vpc", {"create": {}, "import": {}}, '{"create": ...} or {"import": ...}'),
        ("staging", "vpc.create.cidr", {"create": {"cidr": "10.20.0.1/16"}}, "host bits set"),
        ("staging", "vpc.create.cidr", {"create": {"cidr": "10.20.0.0/28"}}, "/16 to /24"),
        (
            "staging",
            "vpc.create.natGateways",
            {"create": {"cidr": "10.20.0.0/16", "natGateways": 0}},
            "at least 1",
        ),
        (
            "staging",
            "vpc.create.natGateways",
            {"create": {"cidr": "10.20.0.0/16", "maxAzs": 2, "natGateways": 3}},
            "outside 0..2",
        ),
        ("staging", "vpc.import.vpcId", {"import": {**IMPORTED_VPC["import"], "vpcId": "vpc-1"}}, "VPC id"),
        (
            "staging",
            "vpc.import.privateSubnetIds",
            {"import": {**IMPORTED_VPC["import"], "privateSubnetIds": ["subnet-0123456789abcdef0"]}},
            "spread evenly",
        ),
        (
            "staging",
            "vpc.import.availabilityZones",
            {"import": {k: v for k, v in IMPORTED_VPC["import"].items() if k != "availabilityZones"}},
            "missing",
        ),
        ("staging", "cluster", "new", '"create" or {"import"'),
        (
            "staging",
            "cluster.import.clusterName",
            {"import": {"clusterName": "has space"}},
            "ECS cluster name",
        ),
        (
            "staging",
            "namespace.import.namespaceArn",
            {
                "import": {
                    **NAMESPACE["import"],
                    "namespaceArn": NAMESPACE["import"]["namespaceArn"].replace("abcdef", "abcdee"),
                }
            },
            "not the ARN of namespace",
        ),
        ("staging", "internalCidrs", [], "at least one"),
        ("staging", "internalCidrs[0]", ["0.0.0.0/0"], "every address"),
        ("staging", "trustedProxyCidrs[1]", ["10.20.0.0/24", "10.20.0.300/24"], "not an IPv4 CIDR"),
        ("staging", "trustedProxyKind", "nginx", "one of none, alb, envoy"),
        ("staging", "trustedProxyKind", "alb", "needs trustedProxyCidrs"),
        ("staging", "corsAllowedOrigins[0]", ["http://ui.example.com"], "an origin such as https://"),
        ("staging", "corsAllowedOrigins[0]", ["*"], "an origin such as https://"),
        ("staging", "corsAllowedOrigins[0]", ["https://ui.example.com/"], "an origin such as https://"),
        ("staging", "cnFallback", "yes", "expected true or false"),
        ("staging", "cnFallback", True, "only with caSource 'imported'"),
        (
            "staging",
            "mlflow.backendStoreSecretName",
            {
                "backendStoreSecretName": "hokusai/staging/mlflow/server-identity",
                "artifactsDestination": "s3://b-1/x",
            },
            "where the mTLS certificates live",
        ),
        (
            "staging",
            "mlflow.artifactsDestination",
            {"backendStoreSecretName": "db", "artifactsDestination": "s3://b-1/runs/*"},
            "not an S3 URI",
        ),
        (
            "staging",
            "mlflow.artifactsDestination",
            {"backendStoreSecretName": "db", "artifactsDestination": "s3://b-1/runs/"},
            "empty segments",
        ),
        (
            "staging",
            "mlflow.artifactsDestination",
            {"backendStoreSecretName": "db", "artifactsDestination": "https://b-1/runs"},
            "not an S3 URI",
        ),
        (
            "staging",
            "authServiceUrl",
            "http://auth.hokus.ai",
            "the scheme must be https (http only where mayDegrade is true)",
        ),
        ("production", "authServiceUrl", "http://auth.hokus.ai", "the scheme must be https"),
        ("staging", "authServiceUrl", "auth.hokus.ai", "the scheme must be https"),
        ("development", "authServiceUrl", "ftp://auth.hokus.ai", "the scheme must be https"),
        ("staging", "authServiceUrl", 443, "not a URL"),
        ("staging", "authServiceUrl", "", "not a URL"),
        ("staging", "authServiceUrl", "https://auth.hokus.ai /v1", "not a URL"),
        ("staging", "authServiceUrl", "https:///v1", "has no host"),
        ("staging", "authServiceUrl", "https://auth.hokus.ai:99999", "not a URL"),
        ("staging", "authServiceUrl", "https://svc:hunter2@auth.hokus.ai", "holds credentials"),
        ("staging", "authServiceUrl", "https://auth.hokus.ai/?token=x", "no query or fragment"),
        ("staging", "authServiceUrl", "https://auth.hokus.ai/#v1", "no query or fragment"),
        ("staging", "redisUrlSecretName", "redis url", "not a Secrets Manager secret name"),
        ("staging", "redisUrlSecretName", ["hokusai/staging/redis-url"], "not a Secrets Manager secret name"),
        (
            "staging",
            "redisUrlSecretName",
            "hokusai/staging/mlflow/redis-url",
            "where the mTLS certificates live",
        ),
        ("staging", "redisUrlSecretName", "hokusai/staging/mlflow-backend-store-uri", "a secret of its own"),
        (
            "staging",
            "redisUrlSecretName",
            "hokusai/staging/api-keys/redis-url",
            "where the stacks create the API-key store's hashing secret",
        ),
        (
            "staging",
            "mlflow.backendStoreSecretName",
            {"backendStoreSecretName": "hokusai/staging/api-keys/db", "artifactsDestination": "s3://b-1/x"},
            "where the stacks create the API-key store's hashing secret",
        ),
        ("staging", "apiKeyStore", "hokusai/staging/api-key-store-url", "expected an object, got str"),
        ("staging", "apiKeyStore.urlSecretName", {}, "missing"),
        ("staging", "apiKeyStore.hashSecretName", {"urlSecretName": "k", "hashSecretName": "h"}, "unknown"),
        ("staging", "apiKeyStore.urlSecretName", {"urlSecretName": "key store"}, "not a Secrets Manager"),
        (
            "staging",
            "apiKeyStore.urlSecretName",
            {"urlSecretName": None},
            "not a Secrets Manager secret name",
        ),
        (
            "staging",
            "apiKeyStore.urlSecretName",
            {"urlSecretName": "hokusai/staging/mlflow/api-key-store-url"},
            "where the mTLS certificates live",
        ),
        (
            "production",
            "apiKeyStore.urlSecretName",
            {"urlSecretName": "hokusai/production/api-keys/hash-secret"},
            "'hokusai/production/api-keys/hash-secret' is under hokusai/production/api-keys/, where the stacks "
            "create the API-key store's hashing secret",
        ),
        (
            "staging",
            "apiKeyStore.urlSecretName",
            {"urlSecretName": "hokusai/staging/mlflow-backend-store-uri"},
            "is mlflow.backendStoreSecretName: the key store needs a secret of its own",
        ),
        (
            "staging",
            "apiKeyStore.usageRetentionDays",
            {"urlSecretName": "k", "usageRetentionDays": 0},
            "0 is outside 1..3650 (leave it out for the runtime's default, 90)",
        ),
        (
            "staging",
            "apiKeyStore.usageRetentionDays",
            {"urlSecretName": "k", "usageRetentionDays": 3651},
            "outside",
        ),
        (
            "staging",
            "apiKeyStore.usageRetentionDays",
            {"urlSecretName": "k", "usageRetentionDays": "90"},
            "not a whole number",
        ),
        (
            "staging",
            "apiKeyStore.usageRetentionDays",
            {"urlSecretName": "k", "usageRetentionDays": True},
            "not a whole number",
        ),
        ("staging", "serviceScopes", ["api"], "expected an object of service -> list of scopes, got list"),
        ("staging", "serviceScopes", {}, "grants no service anything"),
        ("staging", "serviceScopes.api", {"api": "mlflow:read"}, "expected a list, got str"),
        ("staging", "serviceScopes.api", {"api": []}, "at least 1"),
        ("staging", "serviceScopes.api[1]", {"api": ["mlflow:read", "mlflow write"]}, "not a scope"),
        ("staging", "serviceScopes.api[0]", {"api": [7]}, "not a scope"),
        ("staging", "serviceScopes.api", {"api": ["mlflow:read", "mlflow:read"]}, "twice"),
        ("staging", "serviceScopes.my service", {"my service": ["mlflow:read"]}, "not a service name"),
        # routePolicies: the runtime's parser (runtime.auth.route_policy) names the field; the identity and
        # server checks are the settings' own.
        ("staging", "routePolicies", [], "expected an object, got list"),
        (
            "staging",
            "routePolicies.worker",
            {"worker": {"mode": "enforce", "rules": []}},
            "unknown setting; expected mlflow, api",
        ),
        (
            "staging",
            "routePolicies.mlflow",
            {"mlflow": ["GET /health"]},
            "expected an object with mode and rules",
        ),
        (
            "staging",
            "routePolicies.mlflow.mode",
            {"mlflow": {"mode": "block", "rules": []}},
            "expected one of enforce, audit, got 'block'",
        ),
        (
            "production",
            "routePolicies.api",
            {"api": {"mode": "audit", "rules": [], "default": "deny"}},
            "unknown field(s) default",
        ),
        ("staging", "routePolicies.mlflow.rules", {"mlflow": {"mode": "audit"}}, "expected a list"),
        (
            "staging",
            "routePolicies.mlflow.rules[0]",
            {"mlflow": {"rules": [{"identities": ["api"], "methods": ["GET"], "path": ["/health"]}]}},
            "expected exactly identities, methods and paths",
        ),
        (
            "staging",
            "routePolicies.api.rules[1].methods",
            {"api": {"rules": [{**RULE}, {**RULE, "methods": ["GET", "FETCH"]}]}},
            "FETCH is not an HTTP method",
        ),
        (
            "staging",
            "routePolicies.mlflow.rules[0].methods",
            {"mlflow": {"rules": [{**RULE, "methods": []}]}},
            "expected a list of 1 to",
        ),
        (
            "staging",
            "routePolicies.mlflow.rules[0].paths",
            {"mlflow": {"rules": [{**RULE, "paths": ["/api/**/runs"]}]}},
            "** may only end a pattern",
        ),
        (
            "staging",
            "routePolicies.mlflow.rules[0].paths",
            {"mlflow": {"rules": [{**RULE, "paths": ["api/2.0/mlflow/runs/get"]}]}},
            "is not a path pattern (it starts with /)",
        ),
        (
            "development",
            "routePolicies.mlflow.rules[0].paths",
            {"mlflow": {"rules": [{**RULE, "paths": ["/api/../admin"]}]}},
            "has an empty, . or .. segment",
        ),
        (
            "staging",
            "routePolicies.mlflow.rules[1].identities",
            {"mlflow": {"rules": [{**RULE}, {**RULE, "identities": ["worker", "reporter"]}]}},
            "'reporter' is not a service that has a certificate here; expected api, worker",
        ),
        (
            "staging",
            "routePolicies.api.rules[0].identities",
            {"api": {"rules": [{**RULE, "identities": ["server"]}]}},
            "'server' is not a service that has a certificate here",
        ),
        (
            "production",
            "routePolicies.mlflow.rules[0].identities",
            {"mlflow": {"rules": [{**RULE, "identities": ["mlflow"]}]}},
            "'mlflow' is not a service that has a certificate here",
        ),
        (
            "staging",
            "routePolicies.mlflow.rules[0].identities",
            {"mlflow": {"rules": [{**RULE, "identities": [7]}]}},
            "expected non-empty strings",
        ),
        (
            "staging",
            "routePolicies.mlflow",
            {"mlflow": {"rules": [{**RULE, "paths": [f"/p/{i:0500}" for i in range(40)]}]}},
            "more than 16384: it is a container environment variable",
        ),
    ],
)
def test_bad_setting_names_environment_and_setting(env, key, value, problem):
    """`key` is the path the message names; the setting changed is its first segment."""
    top = key.split(".")[0].split("[")[0]
    with pytest.raises(SettingsError) as caught:
        load_settings(with_setting(env, top, _nest(key, value)))
    message = str(caught.value)
    assert f"{CONTEXT_KEY}.{env}.{key}:" in message
    assert problem in message


def _nest(key: str, value: object) -> object:
    """The value of the top-level setting for a test that names a deeper path.

    `images.api.uri` with "x" -> {"mlflow": <valid>, "api": {"uri": "x"}, "worker": <valid>};
    paths under vpc/cluster/namespace/mlflow and list indexes carry the whole value already.
    """
    parts = key.split(".")
    if parts[0] in ("images", "desiredCounts") and len(parts) > 1:
        valid = {
            "images": {s: {"dockerfile": f"docker/Dockerfile.{s}"} for s in ("mlflow", "api", "worker")},
            "desiredCounts": {"mlflow": 1, "api": 1, "worker": 1},
        }[parts[0]]
        inner = value if len(parts) == 2 else {parts[2]: value}
        return {**valid, parts[1]: inner}
    return value


def test_auth_service_url_may_be_plain_http_only_where_the_environment_may_degrade():
    url = "http://auth.development.internal:8080/base"
    raw = with_setting("development", "authServiceUrl", url)
    raw["development"]["mayDegrade"] = True
    assert load_settings(raw)["development"].auth_service_url == url
    for env in ("development", "staging", "production"):  # mayDegrade false (the default): refused
        with pytest.raises(SettingsError, match=rf"{CONTEXT_KEY}\.{env}\.authServiceUrl: .*must be https"):
            load_settings(with_setting(env, "authServiceUrl", url))
    with pytest.raises(SettingsError, match=rf"{CONTEXT_KEY}\.staging\.mayDegrade: expected true or false"):
        load_settings(with_setting("staging", "mayDegrade", "yes"))


@pytest.mark.parametrize("mode", [names.MTLS_MODE_PERMISSIVE, names.MTLS_MODE_OFF])
def test_modes_with_an_api_key_path_on_mlflow_need_the_auth_service(mode):
    """Without AUTH_SERVICE_URL every caller without a certificate gets 401: in `permissive` the
    clients not yet migrated, in `off` (the rollback) everyone."""
    with pytest.raises(
        SettingsError, match=rf"{CONTEXT_KEY}\.staging\.authServiceUrl: required with mtlsMode '{mode}'"
    ):
        load_settings(with_setting("staging", "mtlsMode", mode))
    raw = with_setting("staging", "mtlsMode", mode)
    raw["staging"]["authServiceUrl"] = "https://auth.hokus.ai"
    assert load_settings(raw)["staging"].mtls_mode == mode


def test_authentication_settings_are_parsed():
    raw = with_setting("staging", "authServiceUrl", "https://auth.hokus.ai:8443/keys")
    raw["staging"]["redisUrlSecretName"] = "hokusai/staging/redis-url"
    raw["staging"]["serviceScopes"] = {"api": ["mlflow:read"], "reporter": ["mlflow:read", "reports:*"]}
    staging = load_settings(raw)["staging"]
    assert staging.auth_service_url == "https://auth.hokus.ai:8443/keys"
    assert staging.redis_url_secret_name == "hokusai/staging/redis-url"
    assert dict(staging.service_scopes) == {"api": ("mlflow:read",), "reporter": ("mlflow:read", "reports:*")}


def test_api_key_store_is_parsed():
    raw = with_setting("staging", "apiKeyStore", {"urlSecretName": "hokusai/staging/api-key-store-url"})
    assert load_settings(raw)["staging"].api_key_store == ApiKeyStore(
        url_secret_name="hokusai/staging/api-key-store-url", usage_retention_days=None
    )
    raw["staging"]["apiKeyStore"]["usageRetentionDays"] = 3650
    assert load_settings(raw)["staging"].api_key_store.usage_retention_days == 3650
    assert load_settings(VALID)["staging"].api_key_store is None


def test_the_key_store_url_secret_is_not_the_redis_url_secret():
    """mlflow's execution role reads the Redis URL secret: it would read the key store's password."""
    raw = with_setting("staging", "redisUrlSecretName", "hokusai/staging/shared")
    raw["staging"]["apiKeyStore"] = {"urlSecretName": "hokusai/staging/shared"}
    with pytest.raises(
        SettingsError,
        match=rf"^{CONTEXT_KEY}\.staging\.apiKeyStore\.urlSecretName: is redisUrlSecretName: .*mlflow's execution role",
    ):
        load_settings(raw)


@pytest.mark.infra
def test_a_bad_key_store_setting_fails_synthesis_with_environment_and_field(cdk_context):
    import aws_cdk as cdk

    from app import build_app

    environments = copy.deepcopy(cdk_context[CONTEXT_KEY])
    environments["development"]["apiKeyStore"] = {"urlSecretName": "hokusai/development/api-keys/url"}
    app = cdk.App(context={**cdk_context, CONTEXT_KEY: environments})
    with pytest.raises(SettingsError, match=rf"^{CONTEXT_KEY}\.development\.apiKeyStore\.urlSecretName: "):
        build_app(app)


@pytest.mark.infra
def test_a_bad_setting_fails_synthesis_with_its_name(cdk_context):
    """app.py loads the settings before it builds anything: `cdk synth` stops with the message."""
    import aws_cdk as cdk

    from app import build_app

    environments = copy.deepcopy(cdk_context[CONTEXT_KEY])
    environments["production"]["authServiceUrl"] = "http://auth.hokus.ai"
    app = cdk.App(context={**cdk_context, CONTEXT_KEY: environments})
    with pytest.raises(SettingsError, match=rf"{CONTEXT_KEY}\.production\.authServiceUrl: .*must be https"):
        build_app(app)


@pytest.mark.infra
@pytest.mark.parametrize(
    ("service", "size", "field"),
    [
        ("mlflow", {"cpu": 1024, "memoryMiB": 1024}, "memoryMiB"),
        ("api", {"cpu": 512, "memoryMiB": 1024, "workers": 0}, "workers"),
    ],
)
def test_a_bad_task_size_fails_synthesis_with_environment_service_and_field(
    cdk_context, service, size, field
):
    import aws_cdk as cdk

    from app import build_app

    environments = copy.deepcopy(cdk_context[CONTEXT_KEY])
    environments["staging"]["taskSizes"][service] = size
    app = cdk.App(context={**cdk_context, CONTEXT_KEY: environments})
    with pytest.raises(SettingsError, match=rf"^{CONTEXT_KEY}\.staging\.taskSizes\.{service}\.{field}: "):
        build_app(app)


# Fargate's task cpu -> memory (MiB) combinations, as the ECS Developer Guide lists them
# ("Task CPU and memory"; 8 and 16 vCPU need Linux platform 1.4.0; the services run LATEST).
FARGATE_COMBINATIONS = {
    256: [512, 1024, 2048],
    512: [1024, 2048, 3072, 4096],
    1024: [2048, 3072, 4096, 5120, 6144, 7168, 8192],
    2048: [gib * 1024 for gib in range(4, 16 + 1)],
    4096: [gib * 1024 for gib in range(8, 30 + 1)],
    8192: [gib * 1024 for gib in range(16, 60 + 1, 4)],
    16384: [gib * 1024 for gib in range(32, 120 + 1, 8)],
}


def test_task_sizes_accept_exactly_fargates_cpu_and_memory_combinations():
    where = Where(f"{CONTEXT_KEY}.staging.taskSizes")
    for cpu in (128, *FARGATE_COMBINATIONS, 32768):
        for memory in range(256, 131072 + 1, 256):
            raw = {"worker": {"cpu": cpu, "memoryMiB": memory}}
            if memory in FARGATE_COMBINATIONS.get(cpu, ()):
                assert parse_task_sizes(raw, where)["worker"] == TaskSize(cpu=cpu, memory_mib=memory)
            else:
                with pytest.raises(SettingsError, match=r"staging\.taskSizes\.worker\.(cpu|memoryMiB): "):
                    parse_task_sizes(raw, where)


@pytest.mark.parametrize(
    ("cpu", "derived", "most"),
    [(256, 1, 1), (512, 1, 2), (1024, 1, 4), (2048, 2, 8), (4096, 4, 16), (8192, 8, 32), (16384, 16, 64)],
)
def test_workers_default_to_one_per_whole_vcpu_and_go_up_to_four_per_vcpu(cpu, derived, most):
    memory = FARGATE_COMBINATIONS[cpu][0]
    where = Where(f"{CONTEXT_KEY}.production.taskSizes")
    sizes = parse_task_sizes({"api": {"cpu": cpu, "memoryMiB": memory}}, where)
    assert (sizes["api"].workers, sizes["api"].worker_processes) == (None, derived)
    for workers in (1, most):
        sizes = parse_task_sizes({"mlflow": {"cpu": cpu, "memoryMiB": memory, "workers": workers}}, where)
        assert sizes["mlflow"].worker_processes == workers
    with pytest.raises(
        SettingsError, match=rf"production\.taskSizes\.mlflow\.workers: {most + 1} is outside"
    ):
        parse_task_sizes({"mlflow": {"cpu": cpu, "memoryMiB": memory, "workers": most + 1}}, where)


def test_a_service_left_out_of_task_sizes_keeps_its_default():
    raw = with_setting("staging", "taskSizes", {"api": {"cpu": 2048, "memoryMiB": 4096, "workers": 3}})
    sizes = load_settings(raw)["staging"].task_sizes
    assert dict(sizes) == {
        "mlflow": TaskSize(cpu=1024, memory_mib=2048),
        "api": TaskSize(cpu=2048, memory_mib=4096, workers=3),
        "worker": TaskSize(cpu=512, memory_mib=1024),
    }
    assert load_settings(with_setting("staging", "taskSizes", {}))["staging"].task_sizes == (
        load_settings(VALID)["staging"].task_sizes
    )


def test_cdk_json_keeps_the_default_task_sizes_everywhere(cdk_json_settings):
    defaults = load_settings(VALID)["staging"].task_sizes
    for env, settings in load_settings(cdk_json_settings).items():
        assert dict(settings.task_sizes) == dict(defaults), env


def test_task_size_refuses_what_fargate_would():
    with pytest.raises(ValueError, match="not a Fargate task size"):
        TaskSize(cpu=1024, memory_mib=1024)
    with pytest.raises(ValueError, match="expected 1..2"):
        TaskSize(cpu=512, memory_mib=1024, workers=3)


def test_missing_setting_is_named():
    raw = copy.deepcopy(VALID)
    del raw["staging"]["logRetentionDays"]
    with pytest.raises(SettingsError, match=rf"{CONTEXT_KEY}\.staging\.logRetentionDays: missing"):
        load_settings(raw)


def test_environments_are_whatever_cdk_json_declares_and_bad_names_are_named():
    declared = load_settings({"qa": VALID["staging"], "sandbox-alice": VALID["development"]})
    assert tuple(declared) == ("qa", "sandbox-alice")
    assert not declared["qa"].may_degrade  # fails closed unless declared otherwise
    with pytest.raises(SettingsError, match=rf"{CONTEXT_KEY}\.QA: .*'QA' is not a valid name"):
        load_settings({**VALID, "QA": VALID["staging"]})
    with pytest.raises(SettingsError, match="declares no environment"):
        load_settings({})
    with pytest.raises(SettingsError, match="missing from the CDK context"):
        load_settings(None)


def test_the_services_declaration_is_checked_by_the_runtimes_parser():
    from runtime.service_catalog import DEFAULT_CATALOG
    from stacks.settings import load_services

    default = {service.name: service.as_document() for service in DEFAULT_CATALOG.services}
    assert load_services(default).catalog == DEFAULT_CATALOG
    assert load_services(None).catalog == DEFAULT_CATALOG
    with pytest.raises(SettingsError, match=r"hokusai:services\.worker\.port: only a service that serves"):
        load_services({**default, "worker": {"port": 9000}})
    declared = load_services({**default, "streaming": {"serves": "mtls", "port": 8443, "callers": ["api"]}})
    assert declared.extra == ("streaming",)  # the stacks build it (tests/infra/test_declared_services.py)


def test_settings_are_keyword_only():
    with pytest.raises(TypeError):
        EnvironmentSettings("staging", 90, 90, "destroy")  # type: ignore[misc]


def test_defaults_of_the_optional_settings():
    staging = load_settings(VALID)["staging"]
    assert staging.mtls_mode == names.MTLS_MODE_STRICT and staging.mtls_enabled
    assert staging.alarm_emails == ()
    assert (staging.leaf_lifetime_hours, staging.rotation_hours) == (24, 8)  # renewed before half-life
    assert staging.ca_rollover_start_days == 60 + 5 * 7 + 1
    assert staging.mtls_failure_rate_percent == 1.0
    assert staging.mtls_failure_min_requests == 100
    assert staging.images == {
        s: ImageSource(dockerfile=f"docker/Dockerfile.{s}") for s in ("mlflow", "api", "worker")
    }
    assert dict(staging.desired_counts) == {"mlflow": 1, "api": 1, "worker": 1}
    assert dict(staging.task_sizes) == {
        "mlflow": TaskSize(cpu=1024, memory_mib=2048),
        "api": TaskSize(cpu=512, memory_mib=1024),
        "worker": TaskSize(cpu=512, memory_mib=1024),
    }
    assert {s: size.worker_processes for s, size in staging.task_sizes.items()} == dict.fromkeys(
        ("mlflow", "api", "worker"), 1
    )
    assert staging.vpc == CreateVpc(cidr="10.20.0.0/16", max_azs=2, nat_gateways=1)
    assert (staging.cluster, staging.namespace) == (None, None)
    assert staging.internal_cidrs == ("10.20.0.0/16",), "defaults to the VPC's CIDR"
    assert staging.trusted_proxy_cidrs == ()
    assert staging.creates_network
    assert (staging.auth_service_url, staging.redis_url_secret_name, staging.service_scopes) == (
        None,
        None,
        None,
    )


def test_cdk_json_sets_every_setting_and_strict_mode_everywhere(cdk_json_settings):
    from stacks.settings import _KEYS, _SERVICE_KEYS

    optional = {
        "account",
        "region",
        "redisUrlSecretName",
        "serviceScopes",
        "caRolloverStartDays",
        "rotationHours",
        "apiKeyStore",
        "routePolicies",
    }
    for env, raw in cdk_json_settings.items():
        unset_here = optional | ({"authServiceUrl"} if env == "development" else set())
        assert set(raw) == (set(_KEYS) | set(_SERVICE_KEYS)) - unset_here, env
    settings = load_settings(cdk_json_settings)
    assert {s.mtls_mode for s in settings.values()} == {names.MTLS_MODE_STRICT}
    assert {s.internal_cidrs for s in settings.values()} == {(s.vpc.cidr,) for s in settings.values()}


def test_imports_are_parsed_by_attributes():
    raw = with_setting("staging", "vpc", IMPORTED_VPC)
    raw["staging"].update(cluster={"import": {"clusterName": "platform"}}, namespace=NAMESPACE)
    staging = load_settings(raw)["staging"]
    assert staging.vpc == ImportVpc(
        vpc_id="vpc-0123456789abcdef0",
        cidr="10.99.0.0/16",
        availability_zones=("eu-west-1a", "eu-west-1b"),
        private_subnet_ids=("subnet-0123456789abcdef0", "subnet-0fedcba9876543210"),
    )
    assert staging.cluster == ImportCluster(cluster_name="platform")
    assert staging.namespace == ImportNamespace(
        **{
            "namespace_id": NAMESPACE["import"]["namespaceId"],
            "namespace_arn": NAMESPACE["import"]["namespaceArn"],
        }
    )
    assert staging.internal_cidrs == ("10.99.0.0/16",)
    assert not staging.creates_network


def test_an_imported_namespace_needs_an_imported_vpc():
    with pytest.raises(SettingsError, match=rf"{CONTEXT_KEY}\.staging\.namespace: .*import the VPC too"):
        load_settings(with_setting("staging", "namespace", NAMESPACE))


def test_image_uris_know_their_ecr_repository():
    ecr = ImageSource(uri="123456789012.dkr.ecr.eu-west-1.amazonaws.com/hokusai/api@sha256:" + "0" * 64)
    repository = ecr.ecr_repository
    assert (repository.account, repository.region, repository.name) == (
        "123456789012",
        "eu-west-1",
        "hokusai/api",
    )
    assert repository.tag_or_digest == "sha256:" + "0" * 64
    assert ImageSource(uri="ghcr.io/hokusai/api:1.0").ecr_repository is None
    with pytest.raises(ValueError, match="exactly one"):
        ImageSource(dockerfile="docker/Dockerfile.api", uri="ghcr.io/hokusai/api:1.0")


def test_artifacts_destination_splits_into_bucket_and_prefix():
    raw = with_setting(
        "staging",
        "mlflow",
        {"backendStoreSecretName": "db-uri", "artifactsDestination": "s3://my.bucket-1/a/b"},
    )
    stores = load_settings(raw)["staging"].mlflow
    assert (stores.bucket, stores.prefix) == ("my.bucket-1", "a/b")
    raw["staging"]["mlflow"]["artifactsDestination"] = "s3://my-bucket"
    assert load_settings(raw)["staging"].mlflow.prefix == ""


def test_a_service_left_out_of_images_builds_its_own_dockerfile():
    raw = with_setting("staging", "images", {"mlflow": {"uri": "ghcr.io/hokusai/mlflow:1.0.0"}})
    images = load_settings(raw)["staging"].images
    assert images["mlflow"] == ImageSource(uri="ghcr.io/hokusai/mlflow:1.0.0")
    assert images["api"] == ImageSource(dockerfile="docker/Dockerfile.api")
    with pytest.raises(SettingsError, match=rf"{CONTEXT_KEY}\.staging\.images\.billing: unknown setting"):
        load_settings(with_setting("staging", "images", {"billing": {"uri": "ghcr.io/hokusai/b:1"}}))


# --- routePolicies --------------------------------------------------------------------------------

MLFLOW_POLICY = {
    "mode": "enforce",
    "rules": [
        {"identities": ["worker"], "methods": ["GET", "post"], "paths": ["/api/2.0/mlflow/runs/**"]},
        {"identities": ["*"], "methods": ["GET"], "paths": ["/health", "/version"]},
    ],
}


def test_route_policies_are_read_by_the_runtimes_parser_and_kept_as_compact_json():
    from runtime.auth.route_policy import parse_policy, policy_from_environ

    api_policy = {"mode": "audit", "rules": [{"identities": ["api"], "methods": ["*"], "paths": ["/**"]}]}
    raw = with_setting("staging", "routePolicies", {"mlflow": MLFLOW_POLICY, "api": api_policy})
    policies = load_settings(raw)["staging"].route_policies
    assert set(policies) == {names.MLFLOW_SERVICE, names.API_SERVICE}
    for server, document in ((names.MLFLOW_SERVICE, MLFLOW_POLICY), (names.API_SERVICE, api_policy)):
        setting = policies[server]
        assert setting.compact_json == json.dumps(document, separators=(",", ":"), sort_keys=True)
        assert setting.policy == parse_policy(document)
        # ...and the variable is what the server reads at start.
        assert policy_from_environ({names.ENV_ROUTE_POLICY: setting.compact_json}) == setting.policy
    assert policies[names.MLFLOW_SERVICE].policy.identities() == {"worker"}
    assert policies[names.API_SERVICE].policy.audit


def test_route_policies_default_to_none_and_an_empty_object_is_none():
    assert dict(load_settings(VALID)["staging"].route_policies) == {}
    assert dict(load_settings(with_setting("staging", "routePolicies", {}))["staging"].route_policies) == {}


def test_route_policy_mode_defaults_to_enforce_as_in_the_runtime():
    raw = with_setting("development", "routePolicies", {"api": {"rules": [RULE]}})
    setting = load_settings(raw)["development"].route_policies["api"]
    assert not setting.policy.audit
    assert json.loads(setting.compact_json) == {"rules": [RULE]}


def test_route_policy_identities_follow_service_scopes():
    """With serviceScopes the services it names are the identities there are; without, api and worker."""
    policy = {"rules": [{**RULE, "identities": ["reporter", "api"]}]}
    raw = with_setting("staging", "routePolicies", {"mlflow": policy})
    raw["staging"]["serviceScopes"] = {"api": ["mlflow:read"], "reporter": ["mlflow:read"]}
    assert load_settings(raw)["staging"].route_policies["mlflow"].policy.identities() == {"reporter", "api"}
    raw["staging"]["routePolicies"]["mlflow"]["rules"][0]["identities"] = ["worker"]
    with pytest.raises(
        SettingsError,
        match=rf"^{CONTEXT_KEY}\.staging\.routePolicies\.mlflow\.rules\[0\]\.identities: 'worker' is not a "
        r"service that has a certificate here; expected api, reporter \(the services of serviceScopes\)",
    ):
        load_settings(raw)


def test_the_default_identities_are_the_runtimes_default_scoped_services():
    from runtime.auth.peer_identity import DEFAULT_SERVICE_SCOPES
    from stacks.settings_services import DEFAULT_SCOPED_SERVICES

    assert set(DEFAULT_SCOPED_SERVICES) == set(DEFAULT_SERVICE_SCOPES)


@pytest.mark.infra
def test_a_bad_route_policy_fails_synthesis_with_environment_server_and_field(cdk_context):
    import aws_cdk as cdk

    from app import build_app

    environments = copy.deepcopy(cdk_context[CONTEXT_KEY])
    environments["production"]["routePolicies"] = {"mlflow": {"rules": [{**RULE, "identities": ["billing"]}]}}
    app = cdk.App(context={**cdk_context, CONTEXT_KEY: environments})
    with pytest.raises(
        SettingsError,
        match=rf"^{CONTEXT_KEY}\.production\.routePolicies\.mlflow\.rules\[0\]\.identities: 'billing' ",
    ):
        build_app(app)
