#!/bin/sh
# Entrypoint of the hokusai-mtls images: load this role's certificates, then become the command.
#
# `hokusai-mtls run` is `eval "$(hokusai-mtls load-certs --role R)"; exec "$@"` done safely:
# a failed load exits 1 and the command never starts (in a shell, `eval "$(...)"` hides the
# loader's exit status from `set -e`, and the service would start without certificates).
set -eu
exec hokusai-mtls run --role "$HOKUSAI_MTLS_ROLE" -- "$@"
