"""The API-key store's hashing secret: generated once by Secrets Manager, never rotated, never deleted.

Every key in the store (`runtime.keys`) is kept as `HMAC-SHA256(secret, key)`; the runtime reads
one secret (`HOKUSAI_MTLS_KEY_HASH_SECRET`). A new value therefore makes every key of the
environment unmatchable at once, which is why:

- there is no rotation schedule (cdk-nag's SMG4 is acknowledged, with that reason);
- the removal policy is `RETAIN_ON_UPDATE_OR_DELETE` in EVERY environment, development too,
  whatever `removalPolicy` says: a stack deletion or a replacement keeps the secret (and the keys
  stay valid against a store that outlives the stack); only a creation that CloudFormation rolls
  back deletes it (`DeletionPolicy: RetainExceptOnCreate`), since nothing can have hashed a key
  under a value that never reached a task; the KMS key that encrypts it gets the same policy, as a
  kept secret whose key was deleted could never be read again;
- the generator's settings below must never change: CloudFormation generates a NEW value when
  `GenerateSecretString` changes, which would invalidate every key (a test pins them).

A retained secret keeps its name: deploying the Secrets stack again after deleting it fails on
that name until the retained secret is brought back under the stack (CloudFormation resource
import, `cdk import`) or, if invalidating every key is intended, deleted
(`aws secretsmanager delete-secret --force-delete-without-recovery`).
"""

from __future__ import annotations

from aws_cdk import Acknowledgment, RemovalPolicy, Validations
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from constructs_lib.certificate_secrets import grant_decrypt_via_secrets_manager
from runtime import names

SECRET_LENGTH = 64
"""Characters of the generated value: letters and digits only (no punctuation, no space). The runtime takes
it as base64 (48 bytes) or as text, either way more than its 32-byte minimum (about 380 bits)."""

REMOVAL_POLICY = RemovalPolicy.RETAIN_ON_UPDATE_OR_DELETE
"""Of the secret and of its KMS key, in every environment: `DeletionPolicy: RetainExceptOnCreate`,
`UpdateReplacePolicy: Retain`."""

SMG4_REASON = (
    "The API-key store keeps every key as HMAC-SHA256 under this one secret (HOKUSAI_MTLS_KEY_HASH_SECRET, "
    "read once by the api at start): a rotated value would make every stored key unmatchable at once, so "
    "it has no rotation schedule. Changing it means re-issuing every key: an operator's decision, not a "
    "schedule's."
)


class KeyHashSecret(Construct):
    """`hokusai/<env>/api-keys/hash-secret`, a generated value encrypted with `key`.

    Attributes:
        secret: the Secrets Manager secret (its ARN ends in the six random characters Secrets Manager adds).
        key: the KMS key that encrypts it (the environment's certificate secrets' key).
    """

    def __init__(self, scope: Construct, construct_id: str, *, environment: str, key: kms.Key) -> None:
        """`key` (a key of this app, not an imported one) is retained from here on, like the secret."""
        super().__init__(scope, construct_id)
        self.key = key
        key.apply_removal_policy(REMOVAL_POLICY)
        self.secret = secretsmanager.Secret(
            self,
            "Secret",
            secret_name=names.key_hash_secret_name(environment),
            description=f"hokusai-mtls {names.check_environment(environment)}: the API-key store's hashing "
            "secret (HMAC-SHA256). Never rotate or delete it: every stored API key is a hash under it",
            encryption_key=key,
            generate_secret_string=secretsmanager.SecretStringGenerator(
                password_length=SECRET_LENGTH, exclude_punctuation=True, include_space=False
            ),
            removal_policy=REMOVAL_POLICY,
        )
        Validations.of(self.secret).acknowledge(Acknowledgment(id="AwsSolutions-SMG4", reason=SMG4_REASON))

    def grant_decrypt(self, grantee: iam.IGrantable) -> iam.Grant:
        """`kms:Decrypt` on the key through Secrets Manager only, on the principal's side (the grantee may
        live in another stack). Reading the secret itself is ECS's grant for `secrets=`."""
        return grant_decrypt_via_secrets_manager(self.key, grantee)
