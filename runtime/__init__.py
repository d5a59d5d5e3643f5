"""hokusai-mtls runtime: mutual TLS for Hokusai's services, importable without aws-cdk-lib.

One subpackage per concern, each importing only those below it (docs/DESIGN.md, "Layout"):

    names, errors, json_input, security_level   the shared ground: the contract with the stacks
    certificates/   PEM, issuance, verification, inspection, sets on disk, TLS contexts
    secrets/        the secrets in Secrets Manager; the loader that puts a role's set on disk
    lifecycle/      the Lambdas: first issuance, rotation, CA rotation, expiry
    observability/  metrics, the audit line, log redaction
    clients/        HTTP clients whose TLS follows the loader's security level
    serving/        our TLS listeners (accept loop, h11 protocol, ASGI TLS extension, limits)
    auth/           who called and may they: identity, proxies, API keys, the middleware
    services/       what the images run: serve-mlflow, serve-api and its /mlflow proxy
    cli             `hokusai-mtls`

The library face for a service's own code is importable from here, loaded on first use (so
`import runtime` stays cheap):

>>> from runtime import configure_internal_mtls, create_adaptive_client, APIKeyAuthMiddleware
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "configure_internal_mtls": "runtime.secrets.mlflow_config",
    "start_certificate_refresh": "runtime.secrets.mlflow_config",
    "create_adaptive_client": "runtime.clients.adaptive_client",
    "create_adaptive_sync_client": "runtime.clients.adaptive_client",
    "APIKeyAuthMiddleware": "runtime.auth.middleware",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    """PEP 562: the public names above, imported from where they live when first asked for."""
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
