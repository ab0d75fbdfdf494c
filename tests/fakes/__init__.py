"""Real local HTTP servers that answer as the providers' APIs do, as NBC's Bakong Open API document and
ABA PayWay's API documentation describe them.

Each fake is an ``aiohttp`` application on 127.0.0.1 with an ephemeral port, with a request log and a
queue of scripted answers (429, 500, garbage) that are served before normal handling. Each logged
request carries when it arrived and when its answer was ready (``time.monotonic()``), so a test can tell
whether two requests were in flight at the same time.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer


@dataclass
class Scripted:
    """One canned answer, served once, before the fake's normal behaviour."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    after: int = 0  # requests answered normally before this one is served


@dataclass
class Logged:
    """One request as the fake received it."""

    path: str
    headers: dict[str, str]
    body: bytes
    json: Any = None
    arrived: float = field(default_factory=time.monotonic)  # time.monotonic() when the request came in
    answered: float | None = None                           # ... and when its answer was ready


# Where a request's log entry is kept while it is handled (a typed key on aiohttp versions that have them).
_LOGGED: Any = web.RequestKey("fake_logged", Logged) if hasattr(web, "RequestKey") else "fake_logged"


class FakeServer:
    """Base: start/stop an ``aiohttp`` app, keep a request log, serve scripted answers first."""

    def __init__(self) -> None:
        self.requests: list[Logged] = []
        self.script: list[Scripted] = []
        self.delay: float = 0.0  # seconds to wait before answering (a slow provider)
        self._server: TestServer | None = None

    def app(self) -> web.Application:  # pragma: no cover - overridden
        raise NotImplementedError

    async def start(self) -> str:
        """Start listening; returns the base URL (``http://127.0.0.1:<port>``)."""
        app = self.app()
        app.middlewares.append(self._time_answer)
        self._server = TestServer(app, host="127.0.0.1")
        await self._server.start_server()
        return str(self._server.make_url("")).rstrip("/")

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()
            self._server = None

    async def __aenter__(self) -> "FakeServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake first"
        return str(self._server.make_url("")).rstrip("/")

    def fail_next(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  content_type: str = "application/json", *, after: int = 0) -> None:
        """Queue one canned answer; with ``after=n``, the next ``n`` requests are answered normally first."""
        self.script.append(Scripted(status, body, headers or {}, content_type, after))

    @web.middleware
    async def _time_answer(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response = await handler(request)
        entry = request.get(_LOGGED)
        if entry is not None:
            entry.answered = time.monotonic()
        return response

    async def _log(self, request: web.Request) -> Logged:
        arrived = time.monotonic()
        body = await request.read()
        entry = Logged(request.path, dict(request.headers), body, arrived=arrived)
        request[_LOGGED] = entry
        self.requests.append(entry)
        if self.delay:
            await asyncio.sleep(self.delay)
        return entry

    def _scripted(self) -> web.Response | None:
        if not self.script:
            return None
        if self.script[0].after > 0:
            self.script[0].after -= 1
            return None
        s = self.script.pop(0)
        return web.Response(status=s.status, body=s.body, headers=s.headers, content_type=s.content_type)
