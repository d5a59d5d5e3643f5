"""The whole system on one machine, on loopback (`make local`), and the parts it shares with tests.

Development tooling, not part of the `runtime` package the containers install: it needs moto's
server, Debian's redis-server and the auth-service test double, none of which belong in an image.

- `auth_service`  a TEST DOUBLE of the external auth service (a remote service we do not own)
- `redis_server`  a real redis-server on a free loopback port
- `ports`         free loopback ports
"""
