"""The mTLS certificate secrets of one environment and the KMS key that encrypts them.

The secrets are created as empty shells: the template holds no value and Secrets
Manager generates none. The issuance custom resource (`CertificateLifecycle`) fills them
in AWS on the first deploy (or `hokusai-mtls certs upload` imports a CA before it). An
empty secret fails GetSecretValue with ResourceNotFoundException, a clearer signal than a
random placeholder password that does not parse as PEM.

The revocation lists (`ca-crl`) are the exception to the lifecycle: no issuance, no rotation, no
expiry check. Only an operator's `hokusai-mtls certs revoke` (operator credentials, not a stack
role) writes them, so the secret stays empty until the first revocation, and cdk-nag's SMG4 is
acknowledged on it alone (`CA_REVOCATIONS_SMG4_REASON`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from aws_cdk import Acknowledgment, RemovalPolicy, Stack, Validations
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from constructs_lib.naming import construct_label
from runtime import names

SECRET_READ_ACTIONS = ("secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret")

CA_REVOCATIONS_SMG4_REASON = (
    "ca-crl holds no key or credential: only public revocation lists (PEM X509 CRL blocks), each signed by "
    "the CA it speaks for, that serving tasks check client certificates against. It changes only when an "
    "operator runs `hokusai-mtls certs revoke`; a list does not go stale on a clock (its nextUpdate is its "
    "CA's own expiry). The key material behind it is the CA, and the CA secrets (ca-key, ca-cert, "
    "ca-key-next) have their rotation schedule in this stack. A scheduled rotation of ca-crl would have "
    "nothing to renew, only revocations an operator made to lose."
)


def grant_decrypt_via_secrets_manager(key: kms.IKey, grantee: iam.IGrantable) -> iam.Grant:
    """`kms:Decrypt` on `key` for `grantee`, only through Secrets Manager (`kms:ViaService`), on the
    principal's side alone: nothing goes into the key policy, so a grantee in another stack adds no
    reference from the key's stack to its own (the key policy already lets this account's IAM
    policies use the key)."""
    return iam.Grant.add_to_principal(
        grantee=grantee,
        actions=["kms:Decrypt"],
        resource_arns=[key.key_arn],
        conditions={
            "StringEquals": {"kms:ViaService": f"secretsmanager.{Stack.of(key).region}.amazonaws.com"}
        },
    )


class CertificateSecrets(Construct):
    """A customer-managed KMS key (rotation on) and one empty secret per certificate.

    Attributes:
        key: the KMS key that encrypts every secret below.
        ca_bundle: `hokusai/<env>/mlflow/ca-cert`, the PEM trust bundle every service reads.
        ca_key: `hokusai/<env>/mlflow/ca-key`, the issuing CA; only the issuer may read it.
        ca_key_next: `hokusai/<env>/mlflow/ca-key-next`, the next CA while a rollover runs (the
            CA rotation or the operator's `certs rollover` writes it; no task role reads it).
        ca_revocations: `hokusai/<env>/mlflow/ca-crl`, the CA-signed revocation lists (PEM `X509 CRL`
            blocks); written only by the operator's `certs revoke`, read by every task that accepts
            client certificates (`Identity.reads_revocations`), empty until the first revocation. No rotation schedule (SMG4 acknowledged), and
            no lifecycle function touches it.
        identities: identity name (`server`, `api`, `worker`, any declared one) -> its `<name>-identity`
            secret.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        environment: str,
        removal_policy: RemovalPolicy,
        identities: Sequence[names.Identity] = names.IDENTITIES,
    ) -> None:
        """`identities`: the declared services' (`Catalog.identities`), one secret each."""
        super().__init__(scope, construct_id)
        names.check_environment(environment)
        self._environment = environment
        self._removal_policy = removal_policy

        self.key = kms.Key(
            self,
            "Key",
            description=f"hokusai-mtls {environment}: encrypts the mTLS certificate secrets",
            enable_key_rotation=True,
            removal_policy=removal_policy,
        )
        self.ca_bundle = self._secret(
            "CaBundle",
            names.secret_name(environment, names.CA_BUNDLE_SECRET),
            "PEM trust bundle (one or more CA certificates) for mTLS",
        )
        self.ca_key = self._secret(
            "CaKey",
            names.secret_name(environment, names.CA_KEY_SECRET),
            "Issuing CA certificate and private key; readable only by the issuer",
        )
        self.ca_key_next = self._secret(
            "CaKeyNext",
            names.secret_name(environment, names.CA_NEXT_SECRET),
            "The next CA during a rollover (its `begin`); a no-rollover marker otherwise",
        )
        self.ca_revocations = self._secret(
            "CaRevocations",
            names.secret_name(environment, names.CA_REVOCATIONS_SECRET),
            "Revocation lists (PEM X509 CRL blocks signed by the CA) that serving identities check; "
            "written only by an operator's `hokusai-mtls certs revoke`, empty until the first revocation",
        )
        Validations.of(self.ca_revocations).acknowledge(
            Acknowledgment(id="AwsSolutions-SMG4", reason=CA_REVOCATIONS_SMG4_REASON)
        )
        self.declared_identities = tuple(identities)
        self.identities: Mapping[str, secretsmanager.Secret] = MappingProxyType(
            {
                identity.name: self._secret(
                    f"{construct_label(identity.name)}Identity",
                    names.identity_secret_name(environment, identity),
                    f"Certificate and private key of the {identity.name} identity ({identity.kind.value})",
                )
                for identity in identities
            }
        )

    def identity(self, identity: names.Identity) -> secretsmanager.Secret:
        return self.identities[identity.name]

    def grant_identity(
        self, identity: names.Identity, grantee: iam.IGrantable, *, proxy_kind: str = names.PROXY_KIND_NONE
    ) -> iam.Grant:
        """Let `grantee` load `identity`: read its `<name>-identity` secret and the CA bundle, and,
        if its tasks accept client certificates (`Identity.reads_revocations`: it serves, or a proxy
        of `proxy_kind` forwards them), the revocation lists (`ca-crl`) too.

        Exactly what `Secret.grant_read` gives a principal for a secret with a customer-managed
        key: `secretsmanager:GetSecretValue` and `DescribeSecret` on those secrets (one statement),
        and `kms:Decrypt` on the key only through Secrets Manager (`kms:ViaService`). Unlike
        `grant_read`, nothing goes into the key policy: the grantee lives in another stack
        (its ARN there would make the stacks depend on each other), and the key policy
        already lets IAM policies of this account use the key. A client-only identity that accepts
        no forwarded certificate checks no revocation, so it gets no read on `ca-crl` (least
        privilege). The CA key secrets are never part of a grant, and no grant writes anything.
        """
        secrets = [self.identity(identity), self.ca_bundle]
        if identity.reads_revocations(proxy_kind):
            secrets.append(self.ca_revocations)
        read = iam.Grant.add_to_principal(
            grantee=grantee,
            actions=list(SECRET_READ_ACTIONS),
            resource_arns=[secret.secret_arn for secret in secrets],
        )
        return read.combine(grant_decrypt_via_secrets_manager(self.key, grantee))

    @property
    def all_secrets(self) -> tuple[secretsmanager.Secret, ...]:
        """Every secret of this construct, `ca-crl` included. Not the lifecycle's set: issuance,
        rotation and the expiry check name the secrets they use one by one, and `ca-crl` is none
        of them."""
        return (
            self.ca_bundle,
            self.ca_key,
            self.ca_key_next,
            self.ca_revocations,
            *self.identities.values(),
        )

    def _secret(self, construct_id: str, secret_name: str, description: str) -> secretsmanager.Secret:
        """An empty secret, encrypted with `key`. `CertificateLifecycle`, in the same stack, gives
        every one a rotation schedule except `ca-crl`, whose SMG4 is acknowledged instead."""
        secret = secretsmanager.Secret(
            self,
            construct_id,
            secret_name=secret_name,
            description=f"hokusai-mtls {self._environment}: {description}",
            encryption_key=self.key,
            removal_policy=self._removal_policy,
        )
        # The L2 Secret always asks Secrets Manager to generate a value when given none;
        # dropping GenerateSecretString makes CloudFormation create an empty secret.
        cfn_secret = secret.node.default_child
        if not isinstance(cfn_secret, secretsmanager.CfnSecret):
            raise TypeError(f"{secret.node.path}: expected a CfnSecret, got {type(cfn_secret).__name__}")
        cfn_secret.add_property_deletion_override("GenerateSecretString")
        return secret
