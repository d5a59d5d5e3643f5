"""A small Starlette streaming app for `hokusai-mtls serve --app tests.support.ws_app:app` (tests only).

It reads the caller's identity where the middleware puts it (`scope["state"]`: `service_id`,
`auth_path`), as any app behind `APIKeyAuthMiddleware` does.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

STREAMED = 5


def _caller(state) -> dict:
    return {
        "service_id": getattr(state, "service_id", None),
        "auth_path": getattr(state, "auth_path", None),
    }


async def whoami(request: Request) -> JSONResponse:
    return JSONResponse(_caller(request.state))


async def stream(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_json({"hello": _caller(websocket.state)})
    for index in range(STREAMED):
        await websocket.send_json({"tick": index})
    try:
        while True:
            text = await websocket.receive_text()
            await websocket.send_text(f"echo {len(text)}")
    except WebSocketDisconnect:
        pass


app = Starlette(
    routes=[Route("/whoami", whoami), WebSocketRoute("/stream", stream), WebSocketRoute("/admin", stream)]
)
