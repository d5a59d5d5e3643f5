"""The whole system on one machine, on loopback (`make local`), and the parts it shares with tests.

Development tooling, not part of the `runtime` package the containers install: it needs moto's
server and Debian's redis-server (and PostgreSQL, when installed), none of which belong in an image.
API keys are checked against our own key store (`hokusai-mtls auth ...`), as in ECS.

- `__main__`      `python -m local_stack up|down` (what `make local` runs)
- `up`            the services in dependency order, the key store, their readiness, the checks, Ctrl-C
- `stack`         process supervision: own process groups, the state file, stopping exactly those
- `commands`      the summary, the curl commands to try (run once before "ready"), another key
- `worker`        the worker's job: one MLflow run over mTLS with the loader's exports
- `environment`   the images' commands and a task's environment (shared with tests/integration)
- `auth_service`  a TEST DOUBLE of the external auth service (a remote service we do not own), for
                  tests and benchmarks of that service being down or slow; `make local` does not run it
- `redis_server`  a real redis-server on a free loopback port
- `ports`         free loopback ports
"""
