"""A lean HTTP/1.1 client for the load generators.

The generators run on the same two cores as the service and PostgreSQL, standing in for portals and banks
that would be on other machines: every cycle they spend is taken from the system they measure. aiohttp's
client is general (cookies, redirects, proxies, tracing, URL normalisation) and costs more CPU per request
than the service's own request handling needs; this one only keeps connections alive and sends requests
with a body. Same shape as aiohttp's for what the benchmarks use: ``async with session.post(url, json=...,
headers=...) as r: r.status, await r.read(), await r.json()``.

It reads responses with a ``Content-Length`` or ``Transfer-Encoding: chunked`` body (none for 1xx, 204 and
304; interim 1xx answers are skipped), honours ``Connection: close`` and HTTP/1.0, and raises
``ConnectionError`` when the server closes a connection mid-response or sends what it cannot frame (a request
is never retried: the generator counts it as an error). A connection goes back to the pool only after a
complete answer with nothing left over; after any error or timeout it is closed.
"""

from __future__ import annotations

import asyncio
import json as _json
from typing import Any
from urllib.parse import urlsplit

from multidict import CIMultiDict, CIMultiDictProxy


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future | None = None
        self.closed = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("the server closed the connection"))

    def pending(self) -> bool:
        """Bytes received that no request asked for."""
        return bool(self._buf)

    async def _more(self) -> None:
        if self.closed:
            raise ConnectionError("the server closed the connection")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def exchange(self, request: bytes) -> tuple[int, CIMultiDict, bytes, bool]:
        """Send one request; return the status, the headers, the body, and whether the connection may be reused."""
        assert self.transport is not None
        self.transport.write(request)
        while True:
            version, status, headers = await self._head()
            if not 100 <= status < 200:
                break  # 1xx answers (100 Continue…) are interim: the real one follows
        coding = [c.strip().lower() for c in headers.get("Transfer-Encoding", "").split(",") if c.strip()]
        if status in (204, 304):
            body = b""
        elif coding:
            if coding[-1] != "chunked":
                raise ConnectionError(f"cannot frame a body sent as Transfer-Encoding: {', '.join(coding)}")
            body = await self._chunked()
        elif "Content-Length" in headers:
            length = headers["Content-Length"]
            if not length.isdigit():
                raise ConnectionError(f"bad Content-Length {length!r}")
            size = int(length)
            while len(self._buf) < size:
                await self._more()
            body = bytes(self._buf[:size])
            del self._buf[:size]
        else:
            raise ConnectionError("a response without Content-Length or chunked encoding (read to close: "
                                  "not supported)")
        connection = headers.get("Connection", "").lower()
        reusable = (not self.closed and not self._buf and connection != "close"
                    and (version == "HTTP/1.1" or connection == "keep-alive"))
        return status, headers, body, reusable

    async def _head(self) -> tuple[str, int, CIMultiDict]:
        while (end := self._buf.find(b"\r\n\r\n")) < 0:
            await self._more()
        lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
        del self._buf[:end + 4]
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise ConnectionError(f"not an HTTP status line: {lines[0][:80]!r}")
        headers: CIMultiDict = CIMultiDict()
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
        return parts[0], int(parts[1]), headers

    async def _chunked(self) -> bytes:
        body = bytearray()
        while True:
            while (end := self._buf.find(b"\r\n")) < 0:
                await self._more()
            try:
                size = int(bytes(self._buf[:end]).split(b";", 1)[0], 16)
            except ValueError:
                raise ConnectionError("bad chunk size") from None
            if size < 0:
                raise ConnectionError("bad chunk size")
            while len(self._buf) < end + 2 + size + 2:
                await self._more()
            body += self._buf[end + 2:end + 2 + size]
            del self._buf[:end + 2 + size + 2]
            if size == 0:
                return bytes(body)  # no trailers: the servers measured send none


class Response:
    def __init__(self, status: int, headers: CIMultiDict, body: bytes) -> None:
        self.status = status
        self.headers = CIMultiDictProxy(headers)  # case-insensitive names, as aiohttp's
        self._body = body

    async def read(self) -> bytes:
        return self._body

    async def json(self) -> Any:
        return _json.loads(self._body)


class _Request:
    def __init__(self, session: "Session", url: str, body: bytes, headers: dict[str, str] | None) -> None:
        self._session, self._url, self._body, self._headers = session, url, body, headers

    async def __aenter__(self) -> Response:
        return await self._session._send(self._url, self._body, self._headers)

    async def __aexit__(self, *exc) -> None:
        return None


class Session:
    """Keep-alive connections per host; each request takes an idle one or opens one."""

    def __init__(self, *, timeout: float = 30.0) -> None:
        self._timeout = timeout
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._all: set[_Connection] = set()

    def post(self, url: str, *, json: Any = None, data: bytes | None = None,
             headers: dict[str, str] | None = None) -> _Request:
        if json is not None:
            data = _json.dumps(json).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        return _Request(self, url, data or b"", headers)

    async def _send(self, url: str, body: bytes, headers: dict[str, str] | None) -> Response:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        idle = self._idle.setdefault((host, port), [])
        conn = None
        async with asyncio.timeout(self._timeout):  # connecting counts against the timeout too
            while idle:
                candidate = idle.pop()
                if candidate.closed or candidate.pending():
                    self._drop(candidate)  # closed by the server while idle, or sent something unasked
                else:
                    conn = candidate
                    break
            if conn is None:
                _, conn = await asyncio.get_running_loop().create_connection(_Connection, host, port)
                self._all.add(conn)
            try:
                status, response_headers, response_body, reusable = await conn.exchange(request)
            except BaseException:
                self._drop(conn)  # its state is unknown: never reused
                raise
        if reusable:
            idle.append(conn)
        else:
            self._drop(conn)
        return Response(status, response_headers, response_body)

    def _drop(self, conn: _Connection) -> None:
        self._all.discard(conn)
        if conn.transport is not None:
            conn.transport.close()

    async def close(self) -> None:
        for conn in list(self._all):
            self._drop(conn)
        self._idle.clear()

    async def __aenter__(self) -> "Session":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
