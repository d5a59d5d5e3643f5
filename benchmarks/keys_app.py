"""The platform app `bench_keys.py` mounts in `serve-api` (`HOKUSAI_API_APP=benchmarks.keys_app:app`).

One route, `GET /bench`, that answers at once: behind `APIKeyAuthMiddleware` it leaves the API-key
path (validation from the cache, rate limit, usage recording) as nearly all of a request's cost, so
what recording usage adds is as large a share as it gets. Not `/health`: that route skips the
API-key path.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route


async def bench(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/bench", bench)])
