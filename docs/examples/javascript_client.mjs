// Manage API keys through the key service's REST API with Node's built-in fetch (Node 18 or later;
// `make setup` puts Node 24 in .venv/bin/node): list, create, read the rate-limit headers, ask the
// validation call, rotate, revoke, and watch the revoked key be refused. No packages needed.
//
//   HOKUSAI_API_URL=https://api.example.com HOKUSAI_API_KEY=hk_live_... node docs/examples/javascript_client.mjs
//
// - HOKUSAI_API_URL: the API service's base URL. In staging and production that is the ALB's
//   https:// address: the key API (/api/v1/auth/keys) refuses plain HTTP there with 403
//   `https_required`, and believes `X-Forwarded-Proto: https` only from the trusted proxy (the ALB),
//   never from a client; this example never sends that header. Locally (`make local`) and in
//   tests/integration/test_key_examples.py the API runs with ENVIRONMENT=development, the one
//   environment whose key API also answers plain HTTP, so http://127.0.0.1:PORT works there and what
//   the example sends is exactly what a client sends to the ALB.
// - HOKUSAI_API_KEY: a key with the `keys:manage` scope (your own keys) or `keys:admin` (anyone's),
//   sent as `Authorization: Bearer`, the preferred way (docs/AUTHENTICATION.md).
//
// The key it creates is a throwaway ("javascript example", one day), rotated with no grace and then
// revoked: it leaves two inactive keys behind. A new key is in exactly one answer; the example prints
// only its display prefix, as every log line should (docs/API_KEY_SECURITY.md).
// Exit 0 when every step did what it says, 1 (with the status, the answer and its X-Request-ID) when not.

const KEYS = "/api/v1/auth/keys";
const VALIDATE = "/api/v1/keys/validate";
const NAME = "javascript example";

class Refused extends Error {}

const baseUrl = (process.env.HOKUSAI_API_URL ?? "").replace(/\/+$/, "");
const apiKey = process.env.HOKUSAI_API_KEY ?? "";
if (!baseUrl || !apiKey) {
  console.error("set HOKUSAI_API_URL and HOKUSAI_API_KEY (see the top of this file)");
  process.exit(2);
}

/** One call with the managing key; resolves to {response, body}, or throws Refused. */
async function call(method, path, body, expected) {
  const response = await fetch(baseUrl + path, {
    method,
    headers: { Authorization: `Bearer ${apiKey}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(10_000),
  });
  return { response, body: await checked(response, `${method} ${path}`, expected) };
}

async function checked(response, what, expected) {
  const text = await response.text();
  if (response.status !== expected) {
    const retry = response.status === 429 ? ` (retry after ${response.headers.get("retry-after")} s)` : "";
    throw new Refused(
      `${what}: HTTP ${response.status}${retry}: ${text.slice(0, 300)} ` +
        `(X-Request-ID ${response.headers.get("x-request-id")})`,
    );
  }
  return JSON.parse(text);
}

function showRateLimit(response) {
  const limit = response.headers.get("x-ratelimit-limit");
  if (limit === null) {
    console.log("   no rate-limit headers: the calling key has no rate limit");
    return;
  }
  const reset = response.headers.get("x-ratelimit-reset");
  const resets = new Date(Number(reset) * 1000).toISOString();
  console.log(`   X-RateLimit-Limit: ${limit} (requests per hour for the calling key)`);
  console.log(`   X-RateLimit-Remaining: ${response.headers.get("x-ratelimit-remaining")}`);
  console.log(`   X-RateLimit-Reset: ${reset} (${resets}: when the oldest counted request leaves the hour)`);
}

/** What the validation call (the one other services make) says about `key`; no caller key needed. */
async function validate(key) {
  const response = await fetch(baseUrl + VALIDATE, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ api_key: key }),
    signal: AbortSignal.timeout(10_000),
  });
  if (response.status === 404) {
    await response.text();
    return { is_active: false, unknown: true };
  }
  return checked(response, `POST ${VALIDATE}`, 200);
}

/** Seconds until the validation call says `key` is no longer active (about 1 s on every instance). */
async function waitRefused(key, seconds = 5) {
  const started = performance.now();
  while ((await validate(key)).is_active) {
    if (performance.now() - started > seconds * 1000) {
      throw new Refused(`the key is still active after ${seconds} s`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  return ((performance.now() - started) / 1000).toFixed(1);
}

async function run() {
  const listed = await call("GET", `${KEYS}?limit=20`, undefined, 200);
  const more = listed.body.next_offset === null ? "" : `; more from ?offset=${listed.body.next_offset}`;
  console.log(`1. GET ${KEYS}?limit=20: ${listed.body.keys.length} key(s) visible to the calling key${more}`);
  for (const key of listed.body.keys) {
    const state = key.is_active ? "active" : "inactive";
    console.log(`   ${key.id}  ${key.key_prefix}...  ${key.user_id}  '${key.name}'  ${state}`);
  }
  showRateLimit(listed.response);

  const created = (await call("POST", KEYS, { name: NAME, expires_in_days: 1 }, 201)).body;
  console.log(
    `2. POST ${KEYS}: created ${created.id} (${created.key_prefix}...) for ${created.user_id}, ` +
      `scopes ${JSON.stringify(created.scopes)}, rate limit ${created.rate_limit_per_hour}, ` +
      `expires ${created.expires_at}`,
  );
  console.log("   the key itself is in this answer only: store it in a secret manager now");

  console.log(`3. POST ${VALIDATE}: the new key is known, is_active=${(await validate(created.key)).is_active}`);

  const rotated = (await call("POST", `${KEYS}/${created.id}/rotate`, { grace_hours: 0 }, 201)).body;
  console.log(
    `4. POST ${KEYS}/${created.id}/rotate (grace_hours 0): new key ${rotated.id} (${rotated.key_prefix}...), ` +
      "same scopes, limits and expiry; the old key stops working now " +
      "(the default grace, 24 hours, leaves time to deploy the new key)",
  );
  console.log(`   old key refused after ${await waitRefused(created.key)} s`);
  console.log(`   new key known, is_active=${(await validate(rotated.key)).is_active}`);

  const revoked = (await call("DELETE", `${KEYS}/${rotated.id}`, undefined, 200)).body;
  console.log(`5. DELETE ${KEYS}/${rotated.id}: is_active=${revoked.is_active}, revoked_at ${revoked.revoked_at}`);
  console.log(`   revoked key refused after ${await waitRefused(rotated.key)} s (every instance: about 1 s)`);
}

try {
  await run();
} catch (error) {
  console.error(`failed: ${error instanceof Refused ? error.message : error}`);
  process.exit(1);
}
