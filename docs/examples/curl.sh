#!/usr/bin/env bash
# Manage API keys through the key service's REST API with curl: list, create, read the rate-limit
# headers, ask the validation call, rotate, revoke, and watch the revoked key be refused.
# Needs bash, curl and sed (no jq: the answers are compact JSON, read with sed below).
#
#   HOKUSAI_API_URL=https://api.example.com HOKUSAI_API_KEY=hk_live_... bash docs/examples/curl.sh
#
# - HOKUSAI_API_URL: the API service's base URL. In staging and production that is the ALB's https://
#   address: the key API (/api/v1/auth/keys) refuses plain HTTP there with 403 `https_required`.
#   A note on X-Forwarded-Proto for local use: the key API believes `X-Forwarded-Proto: https` only
#   from a trusted proxy (HOKUSAI_MTLS_TRUSTED_PROXY_CIDRS, the ALB's subnets), which writes it
#   itself; sent by anyone else it is ignored, so adding `-H 'X-Forwarded-Proto: https'` to reach a
#   staging task directly does not work (and must not). Locally, `make local` and
#   tests/integration/test_key_examples.py run the API with ENVIRONMENT=development, the one
#   environment whose key API also answers plain HTTP: http://127.0.0.1:PORT works there without
#   the header, and what this script sends is exactly what a client sends to the ALB. (Only a test
#   that plays the proxy itself, from a trusted proxy address, sends the header: test_key_service.py.)
# - HOKUSAI_API_KEY: a key with the `keys:manage` scope (your own keys) or `keys:admin` (anyone's).
#   It goes as `Authorization: Bearer`, the preferred way, read by curl from a 0600 file
#   (`-H @file`), so it never appears in the process list (`ps`) the way `-H "Authorization: ..."`
#   on the command line does.
#
# The key it creates is a throwaway ("curl example", one day), rotated with no grace and then
# revoked: it leaves two inactive keys behind. Only display prefixes are printed, never a key.
# Exit 0 when every step did what it says, 1 (with the status, the answer and its X-Request-ID) when not.
set -euo pipefail

: "${HOKUSAI_API_URL:?set HOKUSAI_API_URL (see the top of this script)}"
: "${HOKUSAI_API_KEY:?set HOKUSAI_API_KEY (see the top of this script)}"
BASE=${HOKUSAI_API_URL%/}
KEYS=/api/v1/auth/keys
VALIDATE=/api/v1/keys/validate

work=$(umask 077 && mktemp -d)
trap 'rm -rf "$work"' EXIT
printf 'Authorization: Bearer %s\n' "$HOKUSAI_API_KEY" >"$work/auth"

# call METHOD PATH EXPECTED_STATUS [JSON_BODY]: the answer in $work/body, its headers in $work/headers
call() {
  local method=$1 path=$2 expected=$3 body=${4-}
  local args=(-sS -X "$method" -H @"$work/auth" -D "$work/headers" -o "$work/body" -w '%{http_code}')
  if [[ -n $body ]]; then args+=(-H 'Content-Type: application/json' --data "$body"); fi
  local status
  status=$(curl "${args[@]}" "$BASE$path")
  if [[ $status != "$expected" ]]; then
    echo "failed: $method $path: HTTP $status: $(head -c 300 "$work/body") (X-Request-ID $(header x-request-id))" >&2
    if [[ $status == 429 ]]; then echo "retry after $(header retry-after) s" >&2; fi
    exit 1
  fi
}

# header NAME: that response header of the last call (empty if absent)
header() { sed -n "s/^$1: *\([^[:space:]]*\).*/\1/Ip" "$work/headers" | head -n 1; }
# field NAME [FILE]: a string field of a compact JSON answer; raw NAME: a number, boolean or null
field() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p" "${2:-$work/body}" | head -n 1; }
raw() { sed -n "s/.*\"$1\":\([^,}\"]*\).*/\1/p" "${2:-$work/body}" | head -n 1; }

# validate KEY: is_active as the validation call (the one other services make) says; no caller key needed
validate() {
  local status
  status=$(curl -sS -o "$work/validated" -w '%{http_code}' -H 'Content-Type: application/json' \
    --data @- "$BASE$VALIDATE" <<<"{\"api_key\":\"$1\"}")
  case $status in
    200) raw is_active "$work/validated" ;;
    404) echo false ;;
    *) echo "failed: POST $VALIDATE: HTTP $status: $(head -c 300 "$work/validated")" >&2 && return 1 ;;
  esac
}

# wait_refused KEY: until the validation call says the key is no longer active (about 1 s everywhere)
wait_refused() {
  local tries=0 active
  while active=$(validate "$1") && [[ $active == true ]]; do
    tries=$((tries + 1))
    if ((tries > 50)); then echo "failed: the key is still active after 5 s" >&2 && return 1; fi
    sleep 0.1
  done
  [[ $active == false ]] || return 1 # the validation call failed (it said why)
  echo "$tries poll(s) 0.1 s apart"
}

call GET "$KEYS?limit=20" 200
next=$(raw next_offset)
more=$([[ $next == null ]] || echo "; more from ?offset=$next")
echo "1. GET $KEYS?limit=20: $(grep -o '"key_prefix":' "$work/body" | wc -l | tr -d ' ') key(s) visible to the calling key$more"
if [[ -n $(header x-ratelimit-limit) ]]; then
  echo "   X-RateLimit-Limit: $(header x-ratelimit-limit) (requests per hour for the calling key)"
  echo "   X-RateLimit-Remaining: $(header x-ratelimit-remaining)"
  echo "   X-RateLimit-Reset: $(header x-ratelimit-reset) (epoch seconds: when the oldest counted request leaves the hour)"
else
  echo "   no rate-limit headers: the calling key has no rate limit"
fi

call POST "$KEYS" 201 '{"name": "curl example", "expires_in_days": 1}'
created_id=$(field id) created_key=$(field key)
echo "2. POST $KEYS: created $created_id ($(field key_prefix)...) for $(field user_id), expires $(field expires_at)"
echo "   the key itself is in this answer only: store it in a secret manager now"

known=$(validate "$created_key")
echo "3. POST $VALIDATE: the new key is known, is_active=$known"

call POST "$KEYS/$created_id/rotate" 201 '{"grace_hours": 0}'
rotated_id=$(field id) rotated_key=$(field key)
echo "4. POST $KEYS/$created_id/rotate (grace_hours 0): new key $rotated_id ($(field key_prefix)...);" \
  "the old key stops working now (the default grace, 24 hours, leaves time to deploy the new key)"
waited=$(wait_refused "$created_key")
echo "   old key refused after $waited"
known=$(validate "$rotated_key")
echo "   new key known, is_active=$known"

call DELETE "$KEYS/$rotated_id" 200
echo "5. DELETE $KEYS/$rotated_id: is_active=$(raw is_active), revoked_at $(field revoked_at)"
waited=$(wait_refused "$rotated_key")
echo "   revoked key refused after $waited (every instance: about 1 s)"
