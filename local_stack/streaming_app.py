"""The local stack's second server: a small WebSocket streaming app behind `hokusai-mtls serve --app`.

Seed 003's streaming service in miniature. It knows who called from what the middleware put in the scope
(`websocket.state.service_id`, from the verified certificate), never from anything the caller sent. The
route policy the local stack gives it lets the worker open `/stream/metrics` and refuses it
`/stream/admin`, so `make local` shows both answers.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

TICKS = 3
METRICS_PATH = "/stream/metrics"
ADMIN_PATH = "/stream/admin"


async def metrics(websocket: WebSocket) -> None:
    """Greets the caller by its identity, streams a few ticks, closes normally."""
    await websocket.accept()
    caller = getattr(websocket.state, "service_id", None)
    await websocket.send_json({"caller": caller, "auth_path": getattr(websocket.state, "auth_path", None)})
    for tick in range(TICKS):
        await websocket.send_json({"tick": tick})
    await websocket.close()


async def admin(websocket: WebSocket) -> None:
    """Reached only by an identity the route policy allows (none, in the local stack)."""
    await websocket.accept()
    await websocket.send_json({"admin": True})
    await websocket.close()


app = Starlette(routes=[WebSocketRoute(METRICS_PATH, metrics), WebSocketRoute(ADMIN_PATH, admin)])

ROUTE_POLICY = {
    "mode": "enforce",
    "rules": [{"identities": ["worker"], "methods": ["GET"], "paths": [METRICS_PATH]}],
}
"""HOKUSAI_MTLS_ROUTE_POLICY of the local streaming server: the worker may stream metrics, nothing else."""
