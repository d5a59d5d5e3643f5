"""The whole system on one machine, on loopback (`make local`), and the parts it shares with tests.

Development tooling, not part of the `runtime` package the containers install: it needs moto's
server, Debian's redis-server and the auth-service test double, none of which belong in an image.

- `__main__`      `python -m local_stack up|down` (what `make local` runs)
- `up`            the services in dependency order, their readiness, the checks, Ctrl-C handling
- `stack`         process supervision: own process groups, the state file, stopping exactly those
- `commands`      the summary and the curl commands to try (run once before "ready")
- `worker`        the worker's job: one MLflow run over mTLS with the loader's exports
- `environment`   the images' commands and a task's environment (shared with tests/integration)
- `auth_service`  a TEST DOUBLE of the external auth service (a remote service we do not own)
- `redis_server`  a real redis-server on a free loopback port
- `ports`         free loopback ports
"""
