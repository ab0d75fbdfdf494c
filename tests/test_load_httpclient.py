"""The benchmarks' lean HTTP client (load/httpclient.py) reads what the service sends, reuses connections, and
fails a request rather than misread it."""

import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from load.httpclient import Session


@pytest.fixture
async def server():
    seen: list[tuple[str, bytes, str | None, object]] = []

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((request.path_qs, body, request.headers.get("X-Test"), request.transport))
        return web.json_response({"path": request.path_qs, "length": len(body)}, status=201)

    async def chunked(request: web.Request) -> web.StreamResponse:
        r = web.StreamResponse()
        r.enable_chunked_encoding()
        await r.prepare(request)
        for part in (b"first,", b"", b"second," * 1000, b"third"):
            if part:
                await r.write(part)
        await r.write_eof()
        return r

    async def close(request: web.Request) -> web.Response:
        seen.append((request.path_qs, b"", None, request.transport))
        return web.Response(text="bye", headers={"Connection": "close"})

    async def hang_up(request: web.Request) -> web.Response:
        # Headers promising a body that never comes, then the connection goes.
        request.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        request.transport.close()
        await asyncio.sleep(0.1)
        return web.Response()

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response()

    app = web.Application()
    app.router.add_post("/slow", slow)
    app.router.add_post("/echo", echo)
    app.router.add_post("/chunked", chunked)
    app.router.add_post("/close", close)
    app.router.add_post("/hang-up", hang_up)
    srv = TestServer(app)
    await srv.start_server()
    yield srv, seen
    await srv.close()


async def test_a_json_request_is_answered_and_its_connection_reused(server):
    srv, seen = server
    url = str(srv.make_url("/echo?x=1"))
    async with Session() as s:
        for i in range(3):
            async with s.post(url, json={"n": i}, headers={"X-Test": "yes"}) as r:
                assert r.status == 201
                assert await r.json() == {"path": "/echo?x=1", "length": len(b'{"n": 0}')}
    assert [b for _, b, _, _ in seen] == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']
    assert {h for _, _, h, _ in seen} == {"yes"}
    assert len({id(t) for *_, t in seen}) == 1  # one connection, kept alive


async def test_concurrent_requests_open_their_own_connections(server):
    srv, seen = server
    url = str(srv.make_url("/echo"))
    async with Session() as s:
        async def one(i):
            async with s.post(url, data=b"x" * i) as r:
                return (await r.json())["length"]
        assert await asyncio.gather(*(one(i) for i in range(10))) == list(range(10))
    assert len({id(t) for *_, t in seen}) > 1


async def test_a_chunked_body_is_read_whole(server):
    srv, _ = server
    async with Session() as s:
        async with s.post(str(srv.make_url("/chunked")), data=b"") as r:
            assert r.status == 200
            assert await r.read() == b"first," + b"second," * 1000 + b"third"


async def test_a_connection_the_server_closes_is_not_reused(server):
    srv, seen = server
    async with Session() as s:
        for _ in range(2):
            async with s.post(str(srv.make_url("/close")), data=b"") as r:
                assert await r.read() == b"bye"
    assert len({id(t) for *_, t in seen}) == 2


async def test_a_response_cut_short_is_an_error_not_a_short_body(server):
    srv, _ = server
    async with Session() as s:
        with pytest.raises(ConnectionError):
            async with s.post(str(srv.make_url("/hang-up")), data=b""):
                pass
        # The session still works afterwards, on a new connection.
        async with s.post(str(srv.make_url("/echo")), data=b"ok") as r:
            assert (await r.json())["length"] == 2


async def test_a_request_that_takes_too_long_times_out(server):
    srv, _ = server
    async with Session(timeout=0.2) as s:
        with pytest.raises(TimeoutError):
            async with s.post(str(srv.make_url("/slow")), data=b""):
                pass


async def test_headers_are_read_whatever_their_case(server):
    srv, _ = server
    async with Session() as s:
        async with s.post(str(srv.make_url("/echo")), data=b"") as r:
            assert r.headers.get("content-type") == r.headers.get("Content-Type") == "application/json; charset=utf-8"


async def test_after_a_timeout_the_connection_is_not_reused(server):
    srv, seen = server
    async with Session(timeout=0.2) as s:
        async with s.post(str(srv.make_url("/echo")), data=b"first") as r:
            assert (await r.json())["length"] == 5
        with pytest.raises(TimeoutError):
            async with s.post(str(srv.make_url("/slow")), data=b""):
                pass
        # The slow answer may still arrive on the timed-out connection: the next request must not read it.
        async with s.post(str(srv.make_url("/echo")), data=b"second!") as r:
            assert r.status == 201 and (await r.json())["length"] == 7
    first, second = seen[0][3], seen[-1][3]
    assert first is not second


@pytest.fixture
async def raw_server():
    """A TCP server answering each request with the next canned bytes; yields (url, replies, connections)."""
    replies: list[bytes] = []
    connections: list[int] = []

    async def handle(reader, writer):
        connections.append(id(writer))
        try:
            while replies:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), b"0"))
                await reader.readexactly(length)
                writer.write(replies.pop(0))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/", replies, connections
    srv.close()
    await srv.wait_closed()


async def test_interim_answers_are_skipped_and_bodiless_statuses_read_no_body(raw_server):
    url, replies, connections = raw_server
    replies += [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
                b"HTTP/1.1 204 No Content\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlast"]
    async with Session(timeout=2) as s:
        got = []
        for _ in range(4):
            async with s.post(url, data=b"x") as r:
                got.append((r.status, await r.read()))
    assert got == [(201, b"ok"), (304, b""), (204, b""), (200, b"last")]
    assert len(connections) == 1


async def test_a_connection_with_bytes_left_over_or_http_1_0_is_not_reused(raw_server):
    url, replies, connections = raw_server
    replies += [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",  # more than it announced
                b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
    async with Session(timeout=2) as s:
        for _ in range(3):
            async with s.post(url, data=b"x") as r:
                assert await r.read() == b"ok"
    assert len(connections) == 3


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.0 200 OK\r\n\r\nread to close",
    b"SSH-2.0-OpenSSH\r\n\r\n",
])
async def test_what_cannot_be_framed_is_an_error(raw_server, reply):
    url, replies, _ = raw_server
    replies.append(reply)
    async with Session(timeout=2) as s:
        with pytest.raises(ConnectionError):
            async with s.post(url, data=b"x"):
                pass
