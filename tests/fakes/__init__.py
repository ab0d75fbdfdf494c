"""Real local HTTP servers that answer as the providers' APIs do, as NBC's Bakong Open API document and
ABA PayWay's API documentation describe them.

Each fake is an ``aiohttp`` application on 127.0.0.1 with an ephemeral port, with a request log and a
queue of scripted answers (429, 500, garbage) that are served before normal handling.
"""

from __future__ import annotations

import asyncio
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


@dataclass
class Logged:
    """One request as the fake received it."""

    path: str
    headers: dict[str, str]
    body: bytes
    json: Any = None


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
        self._server = TestServer(self.app(), host="127.0.0.1")
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
                  content_type: str = "application/json") -> None:
        """Queue one canned answer."""
        self.script.append(Scripted(status, body, headers or {}, content_type))

    async def _log(self, request: web.Request) -> Logged:
        body = await request.read()
        entry = Logged(request.path, dict(request.headers), body)
        self.requests.append(entry)
        if self.delay:
            await asyncio.sleep(self.delay)
        return entry

    def _scripted(self) -> web.Response | None:
        if not self.script:
            return None
        s = self.script.pop(0)
        return web.Response(status=s.status, body=s.body, headers=s.headers, content_type=s.content_type)
