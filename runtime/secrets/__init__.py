"""The certificate secrets in AWS Secrets Manager and the loader that puts a role's set into its container. Imports certificates and the shared ground."""
