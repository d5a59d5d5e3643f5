"""hokusai-mtls runtime: certificates, loaders and (later) TLS serving for Hokusai's services.

Importable without aws-cdk-lib; the CDK app imports `runtime.names` for the shared contract.
"""

__version__ = "0.1.0"
