"""The web console: three static files (console/: index.html, console.js, console.css; no build step,
no CDN, they ship in the package) served at /console/, and the few JSON routes it needs beyond
Tinker's REST routes, under /api/v1/console/, keyed and owner-scoped like those (`endpoint`).

The page keeps the key in the browser tab (sessionStorage) and calls the Tinker routes with
`X-API-Key` and the OpenAI routes with `Authorization: Bearer`. The routes here: runs with where
each is (in memory, on disk, unloaded), a run's metrics by step, client sessions, the server's
state, and a checkpoint's download link (the token `GetCheckpointArchiveUrl` gives over gRPC).
core/console.py builds what they answer; query strings are refused unless every name is known and
every value a bounded integer.
"""

from __future__ import annotations

import asyncio
from importlib import resources

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from stillroom_server.core import console, validate
from stillroom_server.core.errors import InvalidInput
from stillroom_server.http_api import views
from stillroom_server.http_api.app import TinkerApi, endpoint

V1 = "/api/v1/console"
FILES = {"index.html": "text/html; charset=utf-8", "console.js": "text/javascript; charset=utf-8",
         "console.css": "text/css; charset=utf-8"}
# The page runs only its own script and style, talks only to this server, and is never framed.
HEADERS = {
    "content-security-policy": ("default-src 'none'; script-src 'self'; style-src 'self'; "
                                "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
                                "base-uri 'none'; frame-ancestors 'none'"),
    "x-content-type-options": "nosniff", "referrer-policy": "no-referrer", "x-frame-options": "DENY",
    "cache-control": "no-cache",
}
MAX_QUERY_DIGITS = 10


def query_ints(request: Request, defaults: dict[str, int]) -> dict[str, int]:
    """The query string as integers: only the names in `defaults`, each at most once, in digits."""
    values = dict(defaults)
    seen: set[str] = set()
    for name, text in request.query_params.multi_items():
        if name not in defaults:
            known = ", ".join(defaults) or "none"
            raise InvalidInput(f"{name[:40]}: not a parameter of this route (known: {known})")
        if name in seen:
            raise InvalidInput(f"{name}: given more than once")
        if not (text.isascii() and text.isdigit()) or len(text) > MAX_QUERY_DIGITS:
            raise InvalidInput(f"{name}: must be a whole number of at most {MAX_QUERY_DIGITS} digits, "
                               f"got {text[:20]!r}")
        seen.add(name)
        values[name] = int(text)
    return values


class ConsoleApi:
    def __init__(self, api: TinkerApi) -> None:
        self.api = api
        self.service = api.service
        folder = resources.files("stillroom_server.http_api") / "console"
        self.files = {name: (folder / name).read_bytes() for name in FILES}

    async def page(self, request: Request) -> Response:
        name = request.path_params.get("file", "index.html")
        if name not in FILES:
            return Response("not a file of the console", status_code=404, media_type="text/plain",
                            headers=HEADERS)
        return Response(self.files[name], media_type=FILES[name], headers=HEADERS)

    @staticmethod
    async def to_page(request: Request) -> Response:
        return RedirectResponse("/console/", status_code=308)

    async def console_runs(self, request: Request, owner: str) -> Response:
        query = query_ints(request, {"limit": validate.DEFAULT_LIST_LIMIT, "offset": 0})
        limit, offset = validate.list_window(query["limit"], query["offset"])
        return JSONResponse(console.list_runs(self.service, owner, limit, offset))

    async def console_run(self, request: Request, owner: str) -> Response:
        query_ints(request, {})
        run_id = validate.text(request.path_params["run_id"], "run_id")
        info = self.service.run_info(owner, run_id)
        return JSONResponse(console.run_summary(self.service, owner, info))

    async def console_metrics(self, request: Request, owner: str) -> Response:
        query = query_ints(request, {"requests": console.DEFAULT_METRIC_REQUESTS})
        # store reads and protobuf decoding (up to MAX_METRIC_BYTES): off the event loop
        return JSONResponse(await asyncio.to_thread(console.run_metrics, self.service, owner,
                                                    request.path_params["run_id"], query["requests"]))

    async def console_sessions(self, request: Request, owner: str) -> Response:
        query_ints(request, {})
        return JSONResponse(console.sessions(self.service, owner))

    async def console_server(self, request: Request, owner: str) -> Response:
        query_ints(request, {})
        return JSONResponse(console.server_state(self.service, owner))

    async def console_archive_url(self, request: Request, owner: str) -> Response:
        """A link that downloads the owner's checkpoint as a tar for a few minutes, without a key."""
        query_ints(request, {})
        path, row = self.service.checkpoint_files(owner, views.checkpoint_path(request))
        token, expires_at = self.api.archives.issue(path)
        return JSONResponse({"url": self.api.archives.url_path(token), "expires_at": expires_at.isoformat(),
                             "size_bytes": row.size_bytes, "file_name": f"{path.name}.tar"})


def routes(api: TinkerApi) -> list[Route]:
    page = ConsoleApi(api)
    checkpoint = f"{V1}/training_runs/{{run_id}}/checkpoints/{{kind}}/{{name}}"
    return [
        Route("/console", page.to_page, methods=["GET"]),
        Route("/console/", page.page, methods=["GET"]),
        Route("/console/{file}", page.page, methods=["GET"]),
        Route(f"{V1}/runs", endpoint(api, page.console_runs), methods=["GET"]),
        Route(f"{V1}/runs/{{run_id}}", endpoint(api, page.console_run), methods=["GET"]),
        Route(f"{V1}/runs/{{run_id}}/metrics", endpoint(api, page.console_metrics), methods=["GET"]),
        Route(f"{V1}/sessions", endpoint(api, page.console_sessions), methods=["GET"]),
        Route(f"{V1}/server", endpoint(api, page.console_server), methods=["GET"]),
        Route(f"{checkpoint}/archive_url", endpoint(api, page.console_archive_url), methods=["POST"]),
    ]
